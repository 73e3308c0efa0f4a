"""FT-SAM: fine-tuning on the clean holdout with (adaptive) sharpness-aware minimisation.

Zhu, Wei, Shen, Fan & Wu, "Enhancing Fine-Tuning Based Backdoor Defense with Sharpness-Aware
Minimization", ICCV 2023; the authors' implementation is BackdoorBench's
(github.com/SCLBD/BackdoorBench: defense/ft-sam.py, utils/defense_utils/sam/{sam,util}.py,
config/defense/ft-sam/config.yaml). Backdoor neurons carry large weight norms; SAM's
perturbation, scaled by |w| in its adaptive form, moves them most, so fine-tuning on a little
clean data shrinks them where plain fine-tuning leaves them alone.

One SAM step on a batch: the gradient g at w; the perturbation e = rho * T^2 g / ||T g|| with
T = |w| (adaptive, the authors' default) or T = 1 (plain SAM), over every parameter of the model
at once; the gradient at w + e replaces g; w comes back; the optimizer steps with that
gradient. BatchNorm's running statistics are left alone in the second pass (their momentum is
0 there, as the authors' util.py does).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from bdrun.defenses.base import NOTHING_CARRIED, Carried, Defense, require_holdout
from bdrun.defenses.finetune import OwnSgd, finetune
from bdrun.errors import BdrunError
from bdrun.training import Trainee, TrainingHook
from bdrun.validate import coerce

if TYPE_CHECKING:
    from bdrun.context import RunContext
    from bdrun.state import RunData

PERTURB_EPS = 1e-12  # added to the gradient norm (the authors' perturb_eps)
HALF_PRECISIONS = ("16", "16-mixed", "16-true", 16)


def smooth_cross_entropy(logits: Tensor, y: Tensor, smoothing: float) -> Tensor:
    """Mean cross-entropy against the authors' smoothed targets (util.py smooth_crossentropy):
    1 - smoothing on the label, smoothing / (classes - 1) on each other class. (torch's
    label_smoothing spreads smoothing / classes over every class, the label included.) The
    authors' KL divergence differs from it by the targets' entropy, a constant: same gradient."""
    n_classes = logits.shape[1]
    targets = torch.full_like(logits, smoothing / max(n_classes - 1, 1))
    targets.scatter_(1, y[:, None], 1.0 - smoothing)
    return -(targets * F.log_softmax(logits, dim=1)).sum(1).mean()


def sam_perturbation(params: Sequence[Tensor], rho: float, adaptive: bool) -> list[Tensor]:
    """The ascent step e of every parameter from its `.grad`: rho * T^2 g / (||T g|| + eps), the
    norm taken over all parameters together; T = |w| when `adaptive` (ASAM), else 1."""
    with torch.no_grad():
        scaled = [p.abs() * p.grad if adaptive else p.grad for p in params]
        norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(s) for s in scaled]))
        scale = rho / (norm + PERTURB_EPS)
        return [(p.grad * scale * p.square()) if adaptive else (p.grad * scale) for p in params]


@contextmanager
def frozen_running_stats(model: nn.Module) -> Iterator[None]:
    """BatchNorm layers' running statistics unchanged by the forward passes inside: momentum 0
    (the authors' disable_running_stats), restored afterwards, and their batch count as it was
    (theirs counts the second pass; only a momentum-free BatchNorm would read it)."""
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    saved = [(m.momentum, _batches(m)) for m in norms]
    for m in norms:
        m.momentum = 0.0
    try:
        yield
    finally:
        for m, (momentum, batches) in zip(norms, saved, strict=True):
            m.momentum = momentum
            if batches is not None:
                m.num_batches_tracked.copy_(batches)


def _batches(norm: nn.modules.batchnorm._BatchNorm) -> Tensor | None:
    tracked = norm.num_batches_tracked
    return None if tracked is None else tracked.clone()


class SharpnessAware(TrainingHook):
    """The SAM step as a training hook: the loss of the first pass (smoothed cross-entropy);
    after its backward pass, the gradient at the perturbed weights replaces it
    (`on_after_backward`), so the loop's own optimizer step makes the SAM update. Both training
    loops call it at the same point, with grad mode on."""

    resumable = True  # nothing kept across batches

    def __init__(self, rho: float, adaptive: bool, smoothing: float) -> None:
        self.rho, self.adaptive, self.smoothing = rho, adaptive, smoothing
        self.batch: tuple[Tensor, Tensor] | None = None

    def on_batch(self, x: Tensor, y: Tensor, pos: Tensor, module: Trainee) -> tuple[Tensor, Tensor]:
        self.batch = (x, y)  # the second pass sees the batch the first one saw
        return x, y

    def loss(self, logits: Tensor, y: Tensor, pos: Tensor, module: Trainee) -> Tensor:
        return smooth_cross_entropy(logits, y, self.smoothing)

    def on_after_backward(self, module: Trainee) -> None:
        if self.batch is None:
            return
        x, y = self.batch
        self.batch = None
        model = module.model
        params = [p for p in model.parameters() if p.grad is not None]
        if not params:
            return
        ascent = sam_perturbation(params, self.rho, self.adaptive)
        with torch.no_grad():
            saved = [p.detach().clone() for p in params]
            for p, e in zip(params, ascent, strict=True):
                p.add_(e)
        with torch.enable_grad(), frozen_running_stats(model):
            loss = smooth_cross_entropy(model(x), y, self.smoothing)
            grads = torch.autograd.grad(loss, params, allow_unused=True)
        with torch.no_grad():
            for p, w, g in zip(params, saved, grads, strict=True):
                p.copy_(w)  # exactly the weights of before (w + e - e may differ in the last bit)
                if g is None:
                    p.grad.zero_()
                else:
                    p.grad.copy_(g)
        average_over_ranks(params)

    def key(self) -> dict[str, Any]:
        return {"rho": self.rho, "adaptive": self.adaptive, "smoothing": self.smoothing}


def average_over_ranks(params: Sequence[Tensor]) -> None:
    """With DDP, the mean of the second pass's gradients over the ranks (the first pass's were
    averaged by DDP's backward; the second pass runs on the bare model)."""
    dist = torch.distributed
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() < 2:
        return
    for p in params:
        dist.all_reduce(p.grad)
        p.grad.div_(dist.get_world_size())


class FtSam(Defense):
    """FT-SAM as a repair defense: fine-tune a copy of the model on the clean holdout, every step
    a sharpness-aware one.

    The authors' clean share is 5 % of the training set (config.yaml `ratio`, drawn per class);
    bdrun fine-tunes on the whole clean holdout (dataset.holdout_fraction: 5 % of the training
    split on Fashion-MNIST, the authors' share; 10 % on digits).

    Parameters (defaults from BackdoorBench's defense/ft-sam.py and config/defense/ft-sam/
    config.yaml, the authors' implementation):
        rho: the perturbation radius (rho_max = rho_min = 2.0: constant).
        adaptive: ASAM's |w|-scaled perturbation (ft-sam.py's `--adaptive` is a store_false
            flag: on unless switched off), over every parameter, BatchNorm's and biases too.
        label_smoothing: 0.1, the authors' smoothing (`smooth_cross_entropy`).
        lr, epochs: 0.01, 100.
        batch_size, momentum, weight_decay: SGD as config.yaml (256, 0.9, 5e-4). bdrun's SGD
            uses Nesterov momentum (bdrun.training.optimizer_and_scheduler); theirs is plain.
        The schedule is cosine annealing to 0 over the epochs, stepped per epoch. (ft-sam.py
        steps its CosineAnnealingLR(T_max=100) once per batch, which makes the rate oscillate
        with a period of 200 batches; the per-epoch cosine is what the config's name asks for.)
    Their gradient decomposition (`alpha`, GSAM) is 0 in every config and is left out, as are
    their training transforms (crop, flip): no defense here augments a fine-tuning but NAD.
    The tuned model goes through the model cache.
    """

    name = "ft_sam"

    def __init__(
        self,
        rho: float,
        adaptive: bool,
        label_smoothing: float,
        lr: float,
        epochs: int,
        batch_size: int,
        momentum: float,
        weight_decay: float,
    ) -> None:
        self.sgd = OwnSgd(lr, epochs, batch_size, momentum, weight_decay)
        self.rho = coerce(rho, "float", "defense.rho")
        if self.rho <= 0:
            raise BdrunError(f"defense.rho={rho} must be > 0, e.g. 2.0 (the authors')")
        if not isinstance(adaptive, bool):
            raise BdrunError(f"defense.adaptive={adaptive!r} must be true or false")
        self.adaptive = adaptive
        self.label_smoothing = coerce(label_smoothing, "float", "defense.label_smoothing")
        if not 0 <= self.label_smoothing < 1:
            raise BdrunError(
                f"defense.label_smoothing={label_smoothing} must be in [0, 1), e.g. 0.1"
            )

    def repair(
        self, model: nn.Module, data: RunData, ctx: RunContext, carried: Carried = NOTHING_CARRIED
    ) -> nn.Module:
        require_holdout(data.holdout, data.info.num_classes, "FT-SAM (one image per class)")
        if ctx.hardware.precision in HALF_PRECISIONS:
            raise BdrunError(
                f"defense=ft_sam replaces the gradients that trainer.precision="
                f"{ctx.hardware.precision} scales; use 32-true or bf16-mixed"
            )
        hook = SharpnessAware(self.rho, self.adaptive, self.label_smoothing)
        return finetune(
            model,
            data.holdout,
            ctx,
            self.sgd.lr,
            self.sgd.epochs,
            stream="ft-sam",
            cache_key={"defense": "ft_sam", "sam": hook.key()},
            hooks=[hook],
            settings=self.sgd.settings(ctx.settings, self.label_smoothing),
        )
