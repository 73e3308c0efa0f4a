"""Channel pruning shared by the pruning defenses: ranking, masking, and fast masked evaluation.

Fine-Pruning (Liu, Dolan-Gavitt & Garg, RAID 2018) ranks the output channels of the last conv
layer by their mean activation on clean data and removes the most dormant first; the authors'
code (kangliucn/Fine-pruning-defense, face/conv_output_prune.py) averages pool3 over images and
positions and zeroes conv3's weights and bias. Here a model names the conv it prunes
(`prune_layer`) and the module whose output ranks its channels (`rank_layer`); both can be
overridden from the defense's YAML.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.utils import prune

from bdrun.data.base import to_float
from bdrun.errors import BdrunError
from bdrun.models.probes import channel_stats, get_module, layer_outputs

KEEP_BUFFER = "channel_keep"  # per-channel 0/1 on a pruned block that is not a conv/linear


@dataclass(frozen=True)
class PruneSite:
    """Where channels are pruned: `prune_layer` outputs the channels, `rank_layer` ranks them."""

    prune_layer: str
    rank_layer: str


def resolve_site(model: nn.Module, prune_layer: str | None, rank_layer: str | None) -> PruneSite:
    """The configured layers, else the model's own `prune_layer` / `rank_layer`."""
    prune_name = prune_layer or getattr(model, "prune_layer", "")
    rank_name = rank_layer or getattr(model, "rank_layer", "") or prune_name
    if not prune_name:
        raise BdrunError(
            f"model {type(model).__name__} names no prune layer; set defense.prune_layer=LAYER"
        )
    get_module(model, prune_name)  # a BdrunError listing layers when the name is wrong
    get_module(model, rank_name)
    return PruneSite(prune_name, rank_name)


def chunks(n: int, size: int) -> list[slice]:
    return [slice(start, min(start + size, n)) for start in range(0, n, max(size, 1))]


def reduce_channels(out: Tensor) -> Tensor:
    """Per-sample, per-channel mean of a layer output [N, C, ...] -> [N, C]."""
    return out.flatten(2).mean(2) if out.dim() > 2 else out


@torch.no_grad()
def channel_activity(
    model: nn.Module,
    layer: str,
    x: Tensor,
    batch_size: int = 1024,
    device: str | torch.device = "cpu",
) -> Tensor:
    """Mean activation of each channel of `layer` over all images and positions, [C]."""
    if len(x) == 0:
        raise BdrunError(
            "the clean holdout set is empty; pruning needs clean data to rank channels"
        )
    return channel_stats(model, layer, x, batch_size, device)[0]


def pruning_order(activity: Tensor, exclude: Tensor | None = None) -> Tensor:
    """Channel indices from the least to the most active (ties keep index order); channels in
    `exclude` (already pruned) are left out."""
    order = torch.sort(activity, stable=True).indices
    if exclude is not None:
        order = order[~exclude[order]]
    return order


def pruned_mask(order: Tensor, count: int, channels: int, already: Tensor | None = None) -> Tensor:
    """Bool [C]: the first `count` channels of `order`, plus those `already` pruned."""
    mask = already.clone() if already is not None else torch.zeros(channels, dtype=torch.bool)
    mask[order[:count]] = True
    return mask


# -- masking ------------------------------------------------------------------------------------


def _mask_parameter(module: nn.Module, name: str, keep: Tensor) -> None:
    """Multiply parameter `name` by `keep` through torch's pruning reparametrisation (so it stays
    zero while fine-tuning); a parameter already pruned gets its mask replaced."""
    existing = getattr(module, f"{name}_mask", None)
    if existing is not None:
        existing.copy_(keep.to(existing.dtype))
    else:
        prune.custom_from_mask(module, name, keep.to(getattr(module, name).device))


def _apply_keep_buffer(module: nn.Module, _inputs: object, output: Tensor) -> Tensor:
    keep = getattr(module, KEEP_BUFFER)
    return output * keep.view(1, -1, *([1] * (output.dim() - 2)))


def _mask_output(module: nn.Module, keep: Tensor) -> None:
    """Zero output channels of a block (a residual stage) with a forward hook and a buffer."""
    if hasattr(module, KEEP_BUFFER):
        getattr(module, KEEP_BUFFER).copy_(keep)
    else:
        module.register_buffer(KEEP_BUFFER, keep.clone())
        module.register_forward_hook(_apply_keep_buffer)


def norms_between(model: nn.Module, site: PruneSite, channels: int) -> list[nn.Module]:
    """Affine BatchNorm layers registered after `prune_layer` (and its children) and before
    `rank_layer` that act on the same channels: their shift would revive a zeroed channel."""
    names = [name for name, _ in model.named_modules()]
    start = names.index(site.prune_layer)
    end = names.index(site.rank_layer)
    modules = dict(model.named_modules())
    found = []
    for name in names[start + 1 : end]:
        if name.startswith(site.prune_layer + "."):
            continue
        module = modules[name]
        if (
            isinstance(module, nn.modules.batchnorm._BatchNorm)
            and module.affine
            and module.num_features == channels
        ):
            found.append(module)
    return found


@torch.no_grad()
def mask_channels(model: nn.Module, site: PruneSite, pruned: Tensor) -> nn.Module:
    """Make the `pruned` channels of `site` output exactly zero, in place; returns the model.

    A conv / linear prune layer gets torch.nn.utils.prune.custom_from_mask on its weight and
    bias (as the authors zero conv3's weights and bias). Affine BatchNorms between the prune and
    rank layers are masked too (weight and bias), so the ranked activations of pruned channels
    are zero as well. Any other prune layer (a residual stage) relies on such a BatchNorm, or,
    with none, gets a forward hook zeroing its output channels. `pruned` is the full set: a
    second call replaces the first.
    """
    pruned = pruned.bool().cpu()
    keep = (~pruned).float()
    module = get_module(model, site.prune_layer)
    norms = norms_between(model, site, len(keep))
    if isinstance(module, nn.Conv2d | nn.Conv1d | nn.Linear):
        if module.weight.shape[0] != len(keep):
            raise BdrunError(
                f"layer {site.prune_layer} has {module.weight.shape[0]} output channels, "
                f"not {len(keep)}; check defense.prune_layer / defense.rank_layer"
            )
        weight_keep = keep.view(-1, *([1] * (module.weight.dim() - 1))).expand_as(module.weight)
        _mask_parameter(module, "weight", weight_keep.contiguous())
        if module.bias is not None:
            _mask_parameter(module, "bias", keep)
    elif not norms:
        _mask_output(module, keep.to(next(model.buffers(), keep).device))
    for norm in norms:
        _mask_parameter(norm, "weight", keep)
        _mask_parameter(norm, "bias", keep)
    return model


def _pruning_hooks(model: nn.Module) -> list[tuple[nn.Module, prune.BasePruningMethod]]:
    return [
        (module, hook)
        for module in model.modules()
        for hook in module._forward_pre_hooks.values()
        if isinstance(hook, prune.BasePruningMethod)
    ]


def copy_model(model: nn.Module) -> nn.Module:
    """copy.deepcopy that also works on a pruned model after a forward pass with gradients (its
    masked weights are then non-leaf tensors, which deepcopy refuses)."""
    with torch.no_grad():
        for module, hook in _pruning_hooks(model):
            setattr(module, hook._tensor_name, hook.apply_mask(module))
    return copy.deepcopy(model)


def make_permanent(model: nn.Module) -> nn.Module:
    """Fold torch pruning masks into the weights (plain state dict again); zeros stay zero."""
    for module, hook in _pruning_hooks(model):
        prune.remove(module, hook._tensor_name)
    return model


# -- fast evaluation of many masks -----------------------------------------------------------


class _LeafAt(fx.Tracer):
    def __init__(self, layer: str) -> None:
        super().__init__()
        self.layer = layer

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return qualname == self.layer or super().is_leaf_module(m, qualname)


# per-channel ops that map 0 to 0: masking before them equals masking after them
ZERO_KEEPING_MODULES = (
    nn.ReLU,
    nn.ReLU6,
    nn.LeakyReLU,
    nn.MaxPool1d,
    nn.MaxPool2d,
    nn.AvgPool1d,
    nn.AvgPool2d,
    nn.AdaptiveAvgPool2d,
    nn.AdaptiveMaxPool2d,
    nn.Dropout,
    nn.Identity,
)
ZERO_KEEPING_FUNCTIONS = (torch.relu, F.relu, F.max_pool2d, F.avg_pool2d, F.adaptive_avg_pool2d)


def _zero_keeping(node: fx.Node, source: fx.Node, modules: dict[str, nn.Module]) -> bool:
    if node.all_input_nodes != [source]:
        return False
    if node.op == "call_module":
        return isinstance(modules.get(str(node.target)), ZERO_KEEPING_MODULES)
    return node.op == "call_function" and node.target in ZERO_KEEPING_FUNCTIONS


def _copy_from(
    model: nn.Module, graph: fx.Graph, start: fx.Node, stop: fx.Node | None
) -> fx.GraphModule | None:
    """The nodes of `graph` computed from `start` (its output becomes the input), up to `stop`
    (or the model output); None when they also need other activations of the model."""
    part = fx.Graph()
    env: dict[fx.Node, fx.Node] = {start: part.placeholder("activations")}
    if stop is start:
        part.output(env[start])
    seen_start = False
    for node in graph.nodes if stop is not start else ():
        if node is start:
            seen_start = True
            continue
        if node.op == "get_attr":
            env[node] = part.node_copy(node, lambda n: env[n])
            continue
        if not seen_start or node.op == "placeholder":
            continue
        inputs = node.all_input_nodes
        if node.op == "output":
            if not all(n in env for n in inputs):
                return None
            part.node_copy(node, lambda n: env[n])
            break
        if not any(n in env and n.op != "get_attr" for n in inputs):
            continue  # a branch of the prefix only; if used later the check below rejects it
        if not all(n in env for n in inputs):
            return None
        env[node] = part.node_copy(node, lambda n: env[n])
        if node is stop:
            part.output(env[node])
            break
    module = fx.GraphModule(model, part)
    module.graph.eliminate_dead_code()
    module.recompile()
    return module


def split_after(model: nn.Module, layer: str) -> tuple[nn.Module, nn.Module] | None:
    """(head, tail): the rest of `model` as a function of module `layer`'s output, cut after
    the per-channel, zero-keeping ops that follow it (ReLU, pooling), or None where the model
    cannot be cut (untraceable, or later layers also read earlier activations).

    Masked channels at `layer` are then applied to head(output), which is usually much smaller
    (after pooling), and a pruning curve costs one pass through the model plus one cheap tail
    pass per pruning level, instead of a whole forward pass per level.
    """
    try:
        graph = _LeafAt(layer).trace(model)
    except Exception:  # fx cannot trace data-dependent control flow; fall back to full passes
        return None
    starts = [n for n in graph.nodes if n.op == "call_module" and n.target == layer]
    if len(starts) != 1:
        return None
    modules = dict(model.named_modules())
    cut = starts[0]
    while len(cut.users) == 1 and _zero_keeping(next(iter(cut.users)), cut, modules):
        cut = next(iter(cut.users))
    head = _copy_from(model, graph, starts[0], cut)
    tail = _copy_from(model, graph, cut, None)
    return None if head is None or tail is None else (head, tail)


def _keep_shape(keep: Tensor, acts: Tensor) -> Tensor:
    return keep.view(1, -1, *([1] * (acts.dim() - 2))).to(acts.dtype)


@torch.no_grad()
def masked_predictions(
    model: nn.Module,
    layer: str,
    x: Tensor,
    keeps: Tensor,
    batch_size: int = 1024,
    device: str | torch.device = "cpu",
) -> Tensor:
    """Predicted labels [K, N] of `model` with the channels of `layer`'s output multiplied by
    each row of `keeps` [K, C] (1 = kept, 0 = pruned).

    Equal to the predictions of the pruned model when the pruned channels' outputs at `layer`
    are exactly zero and the rest unchanged, which mask_channels guarantees at the rank layer.
    """
    model.eval().to(device)
    keeps = keeps.float().to(device)
    parts = split_after(model, layer)
    preds = torch.empty(len(keeps), len(x), dtype=torch.long)
    module = get_module(model, layer)
    for part in chunks(len(x), batch_size):
        if parts is not None:
            head, tail = parts
            acts = head(layer_outputs(model, layer, x[part], batch_size, device).to(device))
            masked = torch.empty_like(acts)
            for k, keep in enumerate(keeps):
                torch.mul(acts, _keep_shape(keep, acts), out=masked)
                preds[k, part] = tail(masked).argmax(1).cpu()
            continue
        batch = to_float(x[part].to(device))
        for k, keep in enumerate(keeps):
            handle = module.register_forward_hook(
                lambda _m, _i, out, keep=keep: out * _keep_shape(keep, out)
            )
            try:
                preds[k, part] = model(batch).argmax(1).cpu()
            finally:
                handle.remove()
    return preds
