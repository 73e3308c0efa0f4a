"""IBD-PSC: reject inputs whose prediction survives amplified BatchNorm parameters (detector).

Hou, Feng, Li, Li, Wang & Wang, "IBD-PSC: Input-level Backdoor Detection via Parameter-oriented
Scaling Consistency", ICML 2024; the authors' implementation in BackdoorBox
(core/defenses/IBD_PSC.py). Multiplying the weight and bias of a model's last BatchNorm layers
wrecks its clean predictions, while a trojaned input keeps the backdoor label: the backdoor
rides on features that the amplification makes larger still.
"""

from __future__ import annotations

import copy
import logging
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

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


def scaled_layers(model: nn.Module) -> list[nn.Module]:
    """The layers IBD-PSC amplifies, deepest first (the authors' order): the BatchNorm2d layers,
    or for a model without any, its Conv2d layers. Scaling a BN layer's weight and bias by s
    scales its output by s, which is what scaling the weight and bias of a conv with that BN
    folded into it does; a conv without BN is amplified as such a folded layer."""
    norms = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    layers = norms or [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    return layers[::-1]


@torch.no_grad()
def amplified(model: nn.Module, depth: int, scale: float) -> nn.Module:
    """A copy of `model` whose `depth` deepest scaled layers (`scaled_layers`) have weight and
    bias multiplied by `scale`."""
    copied = copy.deepcopy(model).eval()
    for layer in scaled_layers(copied)[:depth]:
        layer.weight.mul_(scale)
        if layer.bias is not None:
            layer.bias.mul_(scale)
    return copied


class IbdPscDetector(InputDetector):
    """Scores an input by its parameter-oriented scaling consistency (PSC): the mean softmax
    probability that the amplified models (`amplified`, the `depths` deepest layers scaled)
    give the label the original model predicts. Higher = more likely trojaned."""

    def __init__(
        self,
        model: nn.Module,
        depths: list[int],
        scale: float,
        threshold: float,
        batch_size: int,
        device: torch.device | str,
    ) -> None:
        self.model = model
        self.amplified = [amplified(model, depth, scale) for depth in depths]
        self.depths = depths
        self.threshold = threshold
        self.batch_size = max(1, batch_size)
        self.device = torch.device(device)

    @torch.no_grad()
    def score(self, x: Tensor) -> Tensor:
        labels = logits_of(self.model, x, self.batch_size, self.device).argmax(1)
        psc = torch.zeros(len(x))
        rows = torch.arange(len(x))
        for model in self.amplified:
            probs = logits_of(model, x, self.batch_size, self.device).softmax(1)
            psc += probs[rows, labels]
        return psc / len(self.amplified)

    def describe(self, clean: Measured, backdoor: Measured, ctx: RunContext) -> dict[str, Any]:
        """The mean PSC of the clean and the trojaned test inputs."""

        def mean(m: Measured) -> float | None:
            return float(m.scores.mean()) if len(m.scores) else None

        return {"psc_mean_clean": mean(clean), "psc_mean_backdoor": mean(backdoor)}


class IbdPsc(Defense):
    """IBD-PSC input filter with the authors' fixed threshold.

    The first amplification depth k is the smallest number of deepest BN layers whose scaling
    makes the model wrong on more than a share `xi` of the clean holdout (the authors'
    `prob_start`, k from 1 to L - 1 for L BN layers); the detector then averages `n` amplified
    models, the j-th scaling the k + j deepest layers (j = 1..n, at most all L: the authors'
    `range(start, start + n)` and `[:index + 1]`). When no k < L passes `xi` (the authors' code
    has no answer then), every amplified model scales all L layers and the run says so.

    Parameters (defaults from the authors' BackdoorBox class):
        n: amplified models per input (5).
        xi: the holdout error rate the first depth must exceed (0.6).
        threshold: PSC above which an input is rejected (T = 0.9; theirs is PSC >= T).
        frr: null for the fixed T; a rate instead sets the threshold to the clean holdout's
            (1 - frr) quantile of PSC, as bdrun's other detectors calibrate (not the authors').
        scale: the factor on the BN weights and biases (1.5).
    The paper's networks have BatchNorm (model=small_cnn_bn for the small CNN); a model without
    any has its conv layers amplified instead (`scaled_layers`), and the run records which.
    """

    name = "ibd_psc"

    def __init__(
        self, n: int, xi: float, threshold: float, frr: float | None, scale: float
    ) -> None:
        self.n = coerce(n, "int", "defense.n")
        self.xi = coerce(xi, "float", "defense.xi")
        self.threshold = coerce(threshold, "float", "defense.threshold")
        self.frr = None if frr is None else coerce(frr, "float", "defense.frr")
        self.scale = coerce(scale, "float", "defense.scale")
        if self.frr is not None and not 0 < self.frr < 1:
            raise BdrunError(f"defense.frr={self.frr} must be in (0, 1), e.g. 0.01, or null")
        if self.n < 1:
            raise BdrunError(f"defense.n={self.n} must be >= 1, e.g. 5")
        if not 0 <= self.xi < 1:
            raise BdrunError(f"defense.xi={self.xi} must be in [0, 1), e.g. 0.6")
        if not 0 <= self.threshold <= 1:
            raise BdrunError(f"defense.threshold={self.threshold} must be in [0, 1], e.g. 0.9")
        if self.scale <= 1:
            raise BdrunError(f"defense.scale={self.scale} must be > 1, e.g. 1.5")

    def first_depth(self, model: nn.Module, data: RunData, ctx: RunContext) -> int | None:
        """The smallest k < L whose amplified model errs on more than xi of the holdout."""
        holdout = data.holdout
        for depth in range(1, len(scaled_layers(model))):
            predicted = logits_of(
                amplified(model, depth, self.scale),
                holdout.x,
                ctx.settings.eval_batch_size,
                ctx.device,
            ).argmax(1)
            if float((predicted != holdout.y).float().mean()) > self.xi:
                return depth
        return None

    def detector(
        self, model: nn.Module, data: RunData, ctx: RunContext, carried: Carried = NOTHING_CARRIED
    ) -> InputDetector:
        layers = len(scaled_layers(model))
        if layers == 0:
            raise BdrunError(
                "IBD-PSC amplifies BatchNorm or conv layers and this model has neither; use a "
                "convolutional model, e.g. model=small_cnn_bn"
            )
        kind = (
            "batch_norm" if any(isinstance(m, nn.BatchNorm2d) for m in model.modules()) else "conv"
        )
        require_holdout(data.holdout, 1, "IBD-PSC")
        start = self.first_depth(model, data, ctx)
        if start is None:
            ctx.record(
                warnings=[
                    f"IBD-PSC: scaling fewer than all {layers} {kind} layers by "
                    f"{self.scale:g} leaves the holdout error at or below defense.xi="
                    f"{self.xi:g}; every amplified model scales all {layers}"
                ]
            )
            start = layers - 1
        depths = [min(start + j, layers) for j in range(1, self.n + 1)]
        ctx.record(ibd_psc_depths=depths, ibd_psc_layers=layers, ibd_psc_scaled=kind)
        log.info("IBD-PSC: amplified depths %s of %d %s layers", depths, layers, kind)
        detector = IbdPscDetector(
            model, depths, self.scale, self.threshold, ctx.settings.eval_batch_size, ctx.device
        )
        if self.frr is not None:  # the holdout's (1 - frr) quantile instead of the fixed T
            calibrate_on_holdout(detector, detector.score(data.holdout.x), self.frr, ctx, "IBD-PSC")
        return detector
