"""SCALE-UP: reject inputs whose prediction survives amplified pixel values (run-time detector).

Guo, Li, Chen, Guo & Lyu, "SCALE-UP: An Efficient Black-box Input-level Backdoor Detection via
Analyzing Scaled Prediction Consistency", ICLR 2023; the authors' code
(github.com/JunfengGo/SCALE-UP, torch_model_wrapper.py and test.py) and BackdoorBox's
core/defenses/SCALE_UP.py. Multiplying a clean image's pixels drives its prediction away, while
a trojaned image keeps the backdoor label: the trigger dominates even the amplified image.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

from bdrun.data.base import to_float
from bdrun.defenses.base import (
    NOTHING_CARRIED,
    Carried,
    Defense,
    InputDetector,
    Measured,
    calibrate_on_holdout,
    require_holdout,
)
from bdrun.errors import BdrunError
from bdrun.metrics import logits_of
from bdrun.validate import coerce

if TYPE_CHECKING:
    from bdrun.context import RunContext
    from bdrun.state import RunData

log = logging.getLogger(__name__)

NORMALIZATIONS = ("none", "global", "per_class")


class ScaleUpDetector(InputDetector):
    """Scores an input by its scaled prediction consistency (SPC): the share of the scaled
    copies clamp(s * x, 0, 1), s in `scales`, that the model labels as it labels x itself.

    With `normalization` the SPC is standardised with the clean holdout's SPC statistics
    (`fit_normalization`): "global" by one mean and std (BackdoorBox), "per_class" by those of
    the holdout inputs predicted as the same label. Higher = more likely trojaned.
    """

    def __init__(
        self,
        model: nn.Module,
        scales: Sequence[float],
        normalization: str,
        batch_size: int,
        device: torch.device | str,
    ) -> None:
        self.model = model
        self.scales = [float(s) for s in scales]
        self.normalization = normalization
        self.batch_size = max(1, batch_size)
        self.device = torch.device(device)
        self.mean = torch.zeros(1, dtype=torch.float64)
        self.std = torch.ones(1, dtype=torch.float64)
        self.threshold = float("inf")

    @torch.no_grad()
    def spc(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """(SPC, the model's label) of every input of x."""
        images = to_float(x)
        labels = logits_of(self.model, images, self.batch_size, self.device).argmax(1)
        same = torch.zeros(len(x), dtype=torch.float64)
        for s in self.scales:
            scaled = (images * s).clamp_(0, 1)
            same += logits_of(self.model, scaled, self.batch_size, self.device).argmax(1) == labels
        return same / len(self.scales), labels

    def fit_normalization(self, spc: Tensor, labels: Tensor, num_classes: int) -> None:
        """The SPC mean and std (one pair, or one per predicted label) of clean inputs; a label
        the holdout never gets keeps the global pair."""
        mean, std = spc.mean(), spc.std(correction=0).clamp_min(1e-6)
        if self.normalization == "none":
            return
        self.mean = torch.full((num_classes,), float(mean), dtype=torch.float64)
        self.std = torch.full((num_classes,), float(std), dtype=torch.float64)
        if self.normalization == "per_class":
            for c in labels.unique().tolist():
                values = spc[labels == c]
                self.mean[c] = values.mean()
                self.std[c] = values.std(correction=0).clamp_min(1e-6)

    def standardise(self, spc: Tensor, labels: Tensor) -> Tensor:
        if self.normalization == "none":
            return spc
        return (spc - self.mean[labels]) / self.std[labels]

    def measure(self, x: Tensor) -> Measured:
        spc, labels = self.spc(x)
        return Measured(self.standardise(spc, labels).float(), {"spc": spc.float()})

    def score(self, x: Tensor) -> Tensor:
        return self.measure(x).scores

    def describe(self, clean: Measured, backdoor: Measured, ctx: RunContext) -> dict[str, Any]:
        """The mean SPC of the clean and the trojaned test inputs."""

        def mean(m: Measured) -> float | None:
            return float(m.parts["spc"].mean()) if len(m.scores) else None

        return {"spc_mean_clean": mean(clean), "spc_mean_backdoor": mean(backdoor)}


class ScaleUp(Defense):
    """SCALE-UP input filter, calibrated on the clean holdout for a preset false rejection rate
    or with the authors' fixed threshold.

    Parameters (defaults from the authors' code and BackdoorBox):
        scales: pixel multipliers (BackdoorBox SCALE_UP.py's scale_set [3, 5, 7, 9, 11], the
            paper's; the authors' torch_model_wrapper.py takes 1..11). Scaled images are
            clamped to [0, 1], as both do (torch.clamp / torch.clip).
        frr: false rejection rate the threshold is set for on the clean holdout (1 %, as
            strip.yaml and bdrun's other detectors); null uses `threshold` instead.
        threshold: the fixed T used when frr is null: an input whose score exceeds it is
            rejected. The authors' test.py rejects SPC >= 0.5; SPC takes the values
            k / len(scales), none of them 0.5 for five scales, so > 0.5 rejects the same inputs.
            With a normalization T applies to the standardised score.
        normalization: "none" (the authors' test.py, BackdoorBox without a valset), "global"
            (BackdoorBox with a benign valset: (SPC - mean) / std over it, which orders inputs
            as the plain SPC does) or "per_class" (the paper's data-limited setting, statistics
            per label the model predicts). The holdout's SPC is taken against the model's own
            label, as for every other input (BackdoorBox takes it against the true label).
    """

    name = "scale_up"

    def __init__(
        self, scales: Sequence[float], frr: float | None, threshold: float, normalization: str
    ) -> None:
        values = [coerce(s, "float", "defense.scales") for s in scales or ()]
        if not values or min(values) <= 0:
            raise BdrunError(f"defense.scales={scales} must be a non-empty list of numbers > 0")
        frr = None if frr is None else coerce(frr, "float", "defense.frr")
        if frr is not None and not 0 < frr < 1:
            raise BdrunError(f"defense.frr={frr} must be in (0, 1), e.g. 0.01, or null")
        self.threshold = coerce(threshold, "float", "defense.threshold")
        if normalization not in NORMALIZATIONS:
            raise BdrunError(
                f"defense.normalization={normalization!r} must be one of "
                f"{', '.join(NORMALIZATIONS)}"
            )
        self.scales, self.frr, self.normalization = values, frr, normalization

    def detector(
        self, model: nn.Module, data: RunData, ctx: RunContext, carried: Carried = NOTHING_CARRIED
    ) -> InputDetector:
        holdout = data.holdout
        require_holdout(holdout, 2, "SCALE-UP")
        detector = ScaleUpDetector(
            model, self.scales, self.normalization, ctx.settings.eval_batch_size, ctx.device
        )
        spc, labels = detector.spc(holdout.x)
        detector.fit_normalization(spc, labels, ctx.info.num_classes)
        scores = detector.standardise(spc, labels)
        ctx.record(holdout_spc_mean=float(spc.mean()))
        if self.frr is None:
            detector.threshold = self.threshold
        else:
            calibrate_on_holdout(detector, scores, self.frr, ctx, "SCALE-UP")
        log.info(
            "SCALE-UP threshold %.4f (%s, FRR %s)",
            detector.threshold,
            self.normalization,
            "fixed" if self.frr is None else f"{self.frr:.3f}",
        )
        return detector
