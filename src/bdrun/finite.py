"""NaN and inf never become results: checks for numbers read from a user's files (images,
triggers, weights) and a watch that every training loop (the plain and the Lightning loop, and
the attacks' and defenses' own optimisations) reports its losses and weights to.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping

import numpy as np
import torch
from torch import Tensor

from bdrun.errors import BdrunError, TrainingDiverged


def nonfinite_count(values: Tensor | np.ndarray) -> int:
    """How many entries of an array are NaN or +-inf (0 for an integer array)."""
    if isinstance(values, np.ndarray):
        if not np.issubdtype(values.dtype, np.floating):
            return 0
        return int(values.size - np.count_nonzero(np.isfinite(values)))
    if not values.is_floating_point():
        return 0
    return int(values.numel() - torch.isfinite(values).sum())


def check_data(values: Tensor | np.ndarray, what: str) -> None:
    """Refuse numbers read from a file that are NaN or inf; `what` names the file and array,
    e.g. "data/clean.h5: 'data'"."""
    count = nonfinite_count(values)
    if count:
        raise BdrunError(
            f"{what} holds {count} NaN / inf values; replace them with real numbers or drop "
            "those samples"
        )


def check_weights(state: Mapping[str, Tensor | np.ndarray], source: str) -> None:
    """Refuse weights (a state dict read from `source`) that are NaN or inf: they come from a
    training that diverged, and every prediction of such a model is meaningless."""
    counts = {name: nonfinite_count(value) for name, value in state.items()}
    bad = [name for name, count in counts.items() if count]
    if bad:
        raise BdrunError(
            f"{source}: {sum(counts.values())} weights are NaN / inf (first in {bad[0]!r}); "
            "the training that wrote them diverged, use other weights"
        )


def _kind(value: float) -> str:
    return "NaN" if math.isnan(value) else "infinite"


class DivergenceWatch:
    """Notices a training's loss or weights stopping being finite, and says where.

    `observe` each step's loss: it stays on the device, so a GPU loop is not synchronised per
    step. `check` (once an epoch, or where the loop reads values back anyway) reads the loss
    flag and the weights back and raises TrainingDiverged naming the stage, the step or epoch
    and the learning rate.

    `stage`: what is trained, e.g. "the poisoned model's training"; `lr`: its configured
    learning rate, and `lr_setting` the config key users set it with where that is not plain
    train.lr (e.g. "defense.mask_lr"); `total` epochs or steps; `unit`: "epoch" or "step";
    `fix`: the advice that ends the message (default: lower the learning rate).
    """

    def __init__(
        self,
        stage: str,
        lr: float,
        total: int,
        unit: str = "epoch",
        lr_setting: str = "lr",
        fix: str | None = None,
    ) -> None:
        self.stage = stage
        self.lr = lr
        self.total = total
        self.unit = unit
        self.lr_setting = lr_setting
        self.fix = fix or (
            "lower the learning rate" if lr_setting == "lr" else f"lower {lr_setting}"
        )
        self._last_bad: Tensor | None = None  # the last non-finite loss seen, 0 while none

    def observe(self, loss: Tensor) -> None:
        """Note one step's loss (a scalar or one loss per problem) without reading it back."""
        value = loss.detach().float().sum()  # NaN or inf anywhere makes the sum non-finite
        if self._last_bad is None:
            self._last_bad = torch.zeros((), device=value.device)
        self._last_bad = torch.where(torch.isfinite(value), self._last_bad, value)

    def check(self, number: int, weights: Iterable[Tensor] = ()) -> None:
        """Raise TrainingDiverged if a loss observed since the last check, or one of `weights`,
        is NaN or inf; `number` is the epoch or step (from 1) that just ended."""
        what = None
        if self._last_bad is not None:
            last_bad = float(self._last_bad)
            self._last_bad = None
            if not math.isfinite(last_bad):
                what = f"the loss became {_kind(last_bad)}"
        if what is None:
            weights = [w.detach() for w in weights if w.is_floating_point()]
            if weights and not bool(torch.stack([torch.isfinite(w).all() for w in weights]).all()):
                nan = any(bool(torch.isnan(w).any()) for w in weights)
                what = f"the weights became {'NaN' if nan else 'infinite'}"
        if what is not None:
            raise TrainingDiverged(
                f"training diverged: {what} in {self.unit} {number} of {self.total} of "
                f"{self.stage} ({self.lr_setting} {self.lr:g}); {self.fix}"
            )
