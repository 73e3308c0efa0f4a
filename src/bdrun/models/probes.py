"""Probes that read a model: batched access to its internal activations and input gradients,
for attacks and defenses alike (ranking, clustering, reversing, saliency), and the norm balls
that adversarial perturbations of its inputs are kept in."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch
from torch import Tensor, nn

from bdrun.data.base import to_float
from bdrun.errors import BdrunError
from bdrun.metrics import on_device


@contextmanager
def frozen_weights(model: nn.Module) -> Iterator[None]:
    """Within the block the model's trainable parameters need no gradient (an input, a mask
    or a trigger is what is optimised, so backward skips the weights' gradients); they are
    trainable again afterwards, also after an error."""
    trainable = [p for p in model.parameters() if p.requires_grad]
    for p in trainable:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p in trainable:
            p.requires_grad_(True)


def get_module(model: nn.Module, name: str) -> nn.Module:
    """The submodule called `name` (dotted path), or a BdrunError listing a few valid names."""
    modules = dict(model.named_modules())
    if name not in modules:
        names = [n for n in modules if n][:12]
        raise BdrunError(f"model has no layer {name!r}; layers include: {', '.join(names)}")
    return modules[name]


@torch.no_grad()
def run_with_hook(
    model: nn.Module,
    layer: str,
    hook: Callable[[nn.Module, object, Tensor], None],
    x: Tensor,
    batch_size: int = 1024,
    device: str | torch.device = "cpu",
) -> None:
    """Run `model` in eval mode on `device` over x (any storage dtype) batch by batch with a
    forward hook on module `layer`, which sees every batch's output of that layer. The model
    goes back to where it was."""
    handle = get_module(model, layer).register_forward_hook(hook)
    try:
        with on_device(model.eval(), device):
            for start in range(0, len(x), batch_size):
                model(to_float(x[start : start + batch_size].to(device)))
    finally:
        handle.remove()


def layer_outputs(
    model: nn.Module,
    layer: str,
    x: Tensor,
    batch_size: int = 1024,
    device: str | torch.device = "cpu",
) -> Tensor:
    """Output of module `layer` for every image of x (any storage dtype), on the CPU."""
    captured: list[Tensor] = []

    def keep(_module: nn.Module, _inputs: object, out: Tensor) -> None:
        captured.append(out.detach().float().cpu())

    run_with_hook(model, layer, keep, x, batch_size, device)
    return torch.cat(captured) if captured else torch.empty(0)


@torch.no_grad()
def channel_stats(
    model: nn.Module,
    layer: str,
    x: Tensor,
    batch_size: int = 1024,
    device: str | torch.device = "cpu",
) -> tuple[Tensor, Tensor]:
    """(mean, max) of every output channel of `layer` over all images and positions, reduced
    batch by batch so that no [N, C, H, W] activation tensor is ever held."""
    totals: dict[str, Tensor] = {}
    positions = 0

    def reduce(_module: nn.Module, _inputs: object, out: Tensor) -> None:
        nonlocal positions
        per_channel = out.detach().float().transpose(0, 1).flatten(1)  # [C, N * H * W]
        sums, peaks = per_channel.sum(1).cpu(), per_channel.amax(1).cpu()
        totals["sum"] = totals["sum"] + sums if "sum" in totals else sums
        totals["max"] = torch.maximum(totals["max"], peaks) if "max" in totals else peaks
        positions += per_channel.shape[1]

    run_with_hook(model, layer, reduce, x, batch_size, device)
    return totals["sum"] / max(positions, 1), totals["max"]


def cross_entropy_sum(logits: Tensor, labels: Tensor) -> Tensor:
    return torch.nn.functional.cross_entropy(logits, labels, reduction="sum")


def input_gradients(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    objective: Callable[[Tensor, Tensor], Tensor] = cross_entropy_sum,
    batch_size: int = 1024,
    device: str | torch.device = "cpu",
) -> Tensor:
    """d objective(model(x_b), y_b) / d x for every image (eval mode, batched, images in the
    model's dtype), on the CPU as [N, C, H, W]. The objective sums over the batch and the
    images of an eval-mode batch are independent, so each row is its own sample's gradient;
    gradients with respect to the weights are never formed. The model goes back to where it
    was."""
    grads = []
    dtype = next(model.parameters()).dtype  # a float64 model gets float64 inputs
    with on_device(model.eval(), device), torch.enable_grad():
        for start in range(0, len(x), batch_size):
            batch = to_float(x[start : start + batch_size].to(device)).to(dtype)
            batch.requires_grad_(True)
            labels = y[start : start + batch_size].to(device)
            (grad,) = torch.autograd.grad(objective(model(batch), labels), batch)
            grads.append(grad.detach().cpu())
    return torch.cat(grads) if grads else torch.empty(0)


@torch.no_grad()
def penultimate(
    model: nn.Module, x: Tensor, batch_size: int = 1024, device: str | torch.device = "cpu"
) -> Tensor:
    """`model.features(x)` (the input of the last linear layer) for every image, on the CPU;
    the model goes back to where it was."""
    with on_device(model.eval(), device):
        feats = [
            model.features(to_float(x[start : start + batch_size].to(device))).float().cpu()
            for start in range(0, len(x), batch_size)
        ]
    return torch.cat(feats) if feats else torch.empty(0)


NORMS = ("linf", "l2")


def project_perturbation(delta: Tensor, norm: str, bound: float) -> Tensor:
    """`delta` [N, ...] with each row put back into the `norm` ball of radius `bound` around
    zero: clipped to [-bound, bound] per pixel (linf), or scaled down to L2 norm `bound` where
    it is longer (l2). Rows are independent, so a universal perturbation is a batch of one.
    Bounds are in the units of the images given to the model: bdrun's pixel space [0, 1]."""
    if norm == "linf":
        return delta.clamp(-bound, bound)
    if norm == "l2":
        lengths = delta.flatten(1).norm(dim=1).clamp_min(1e-12)
        scale = (bound / lengths).clamp(max=1).view(-1, *([1] * (delta.dim() - 1)))
        return delta * scale
    raise ValueError(f"norm {norm!r} is not one of {NORMS}")
