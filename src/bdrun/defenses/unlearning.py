"""What the adversarial-unlearning repairs (I-BAU, SAU) share: adding a perturbation to images,
the clean holdout as tensors with a check of its size, and the model's optimizer.

Both work in bdrun's pixel space: images are floats in [0, 1] and the model normalises inside
(bdrun.models.base.ImageClassifier), so a perturbation's bound is in pixel units, as in the
authors' code (I-BAU feeds unnormalised [0, 1] images; SAU's BackdoorBench code adds its
perturbation to the de-normalised image and normalises again).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import Tensor

from bdrun.data.base import to_float
from bdrun.defenses.base import require_holdout

if TYPE_CHECKING:
    from bdrun.context import RunContext
    from bdrun.data.base import ImageSet


def perturbed(x: Tensor, delta: Tensor, clamp: bool) -> Tensor:
    """x + delta (delta broadcast over the batch when it is one universal perturbation), clipped
    to the valid pixel range [0, 1] when `clamp`."""
    out = x + delta
    return out.clamp(0, 1) if clamp else out


def holdout_tensors(holdout: ImageSet, ctx: RunContext, who: str) -> tuple[Tensor, Tensor]:
    """The clean holdout as float images in [0, 1] and labels on the run's device; a one-line
    error when it holds fewer images than the data set has classes (unlearning from fewer
    clean images than labels has nothing to keep each label by)."""
    require_holdout(holdout, ctx.info.num_classes, who)
    return to_float(holdout.x).to(ctx.device), holdout.y.to(ctx.device)


def outer_optimizer(
    params: list[Tensor], kind: str, lr: float, weight_decay: float
) -> torch.optim.Optimizer:
    """The model's optimizer: Adam (betas 0.9, 0.999, torch's default and BackdoorBench's
    adam_betas) or plain SGD (no momentum), as the authors' `--optim` choices."""
    if kind == "adam":
        return torch.optim.Adam(params, lr=lr, weight_decay=weight_decay)
    return torch.optim.SGD(params, lr=lr, weight_decay=weight_decay)
