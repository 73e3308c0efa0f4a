"""STRIP: reject inputs whose prediction survives superimposed clean images (a run-time detector).

Gao et al., "STRIP: A Defence Against Trojan Attacks on Deep Neural Networks", ACSAC 2019, and
the authors' notebook (github.com/garrisongys/STRIP). A trigger dominates the prediction of any
image it is blended into, so a trojaned input keeps one confident label across perturbations
(low entropy) while a clean input does not.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from bdrun.data.base import to_float
from bdrun.defenses.base import (
    NOTHING_CARRIED,
    Carried,
    Defense,
    InputDetector,
    Measured,
    require_holdout,
)
from bdrun.errors import BdrunError
from bdrun.report.histograms import clean_vs_trojaned
from bdrun.rng import generator

if TYPE_CHECKING:
    from bdrun.context import RunContext
    from bdrun.state import RunData

log = logging.getLogger(__name__)

THRESHOLD_METHODS = ("normal", "quantile")
HISTOGRAM_FILE = "strip_entropy.png"


class StripDetector(InputDetector):
    """Scores inputs by minus their mean prediction entropy over `n_overlays` blends.

    Each input x is blended with `n_overlays` clean images o drawn at random from `overlays`
    as `input_weight * x + overlay_weight * o` (clamped to [0, 1] only when `clip`); the score is
    minus the Shannon entropy (bits) of the softmax, averaged over the blends, so higher means
    more likely trojaned. All blends of a chunk of inputs go through the model in one forward
    pass. Overlay draws come from a fresh generator on every call, so the same inputs always get
    the same score.
    """

    def __init__(
        self,
        model: nn.Module,
        overlays: Tensor,
        n_overlays: int,
        input_weight: float,
        overlay_weight: float,
        clip: bool,
        inputs_per_pass: int,
        device: torch.device | str,
        seed: int,
    ) -> None:
        self.model = model
        self.device = torch.device(device)
        self.overlays = overlays.to(self.device)
        self.n_overlays = n_overlays
        self.input_weight = input_weight
        self.overlay_weight = overlay_weight
        self.clip = clip
        self.inputs_per_pass = max(1, inputs_per_pass)
        self.seed = seed
        self.threshold = float("inf")

    @torch.no_grad()
    def entropy(self, x: Tensor) -> Tensor:
        """Mean entropy (bits) of the model's prediction over the blends of every input of x."""
        picks = torch.randint(
            len(self.overlays),
            (len(x), self.n_overlays),
            generator=generator(self.seed, "strip-overlays"),
        ).to(self.device)
        self.model.eval().to(self.device)
        out = []
        for start in range(0, len(x), self.inputs_per_pass):
            stop = start + self.inputs_per_pass
            inputs = to_float(x[start:stop].to(self.device))  # [k, C, H, W]
            chosen = to_float(self.overlays[picks[start:stop]])  # [k, n, C, H, W]
            blends = self.input_weight * inputs.unsqueeze(1) + self.overlay_weight * chosen
            if self.clip:
                blends.clamp_(0, 1)
            probs = F.softmax(self.model(blends.flatten(0, 1)).float(), dim=1)
            # p log p -> 0 as p -> 0 (the authors' np.nansum)
            bits = -(probs * torch.log2(probs.clamp_min(1e-30))).sum(1)
            out.append(bits.view(len(inputs), self.n_overlays).mean(1).cpu())
        return torch.cat(out) if out else torch.empty(0)

    def score(self, x: Tensor) -> Tensor:
        return -self.entropy(x)

    def describe(self, clean: Measured, backdoor: Measured, ctx: RunContext) -> dict[str, Any]:
        """The entropy histogram of the clean and the trojaned test inputs (PNG, logger) and
        the entropy boundary."""
        path = clean_vs_trojaned(
            -clean.scores,
            -backdoor.scores,
            ctx.run_dir / HISTOGRAM_FILE,
            threshold=-self.threshold,
            xlabel="mean entropy of the prediction over blends (bits)",
            title=f"STRIP, {self.n_overlays} overlays: clean vs trojaned test inputs",
        )
        ctx.logger.log_image("strip/entropy_histogram", path)
        return {"entropy_threshold": -self.threshold}

    def calibrate(self, clean_entropy: Tensor, frr: float, method: str) -> float:
        """Set the threshold so that a share `frr` of clean inputs is rejected; return the
        entropy boundary. "normal" fits a normal distribution to the clean entropies and takes
        its `frr` quantile (the authors' notebook, scipy.stats.norm); "quantile" takes the
        empirical quantile."""
        values = clean_entropy.double()
        if method == "normal":
            mean, std = float(values.mean()), float(values.std(correction=0))
            normal = torch.distributions.Normal(
                torch.tensor(mean, dtype=torch.float64),
                torch.tensor(max(std, 1e-12), dtype=torch.float64),
            )
            boundary = float(normal.icdf(torch.tensor(frr, dtype=torch.float64)))
        else:
            boundary = float(torch.quantile(values, frr))
        self.threshold = -boundary
        return boundary


class Strip(Defense):
    """STRIP input filter, calibrated on the clean holdout for a preset false rejection rate.

    Parameters (defaults from the paper and the authors' notebook):
        n_overlays: clean images blended into each input (N = 100).
        frr: false rejection rate the threshold is set for on clean holdout data (1 %).
        input_weight, overlay_weight: blend weights; the notebook's
            cv2.addWeighted(background, 1, overlay, 1, 0) on float images is a plain sum (1, 1).
        clip: clamp blends to [0, 1] (on). The notebook's float images are not saturated by
            cv2; 8-bit images would be. Clamped blends stay in the range the model was trained
            on and keep a saturated trigger intact; on Fashion-MNIST BadNets they catch more
            trojaned inputs (docs/defenses/strip.md).
        threshold_method: "normal" (the notebook fits a normal to the clean entropies) or
            "quantile" (empirical quantile of the clean entropies).
        overlay_share: share of the holdout that supplies overlay images; the rest calibrates the
            threshold, so no input is ever blended with itself.
    """

    name = "strip"

    def __init__(
        self,
        n_overlays: int,
        frr: float,
        input_weight: float,
        overlay_weight: float,
        clip: bool,
        threshold_method: str,
        overlay_share: float,
    ) -> None:
        if int(n_overlays) < 1:
            raise BdrunError(f"defense.n_overlays={n_overlays} must be >= 1")
        if not 0 < float(frr) < 1:
            raise BdrunError(f"defense.frr={frr} must be in (0, 1), e.g. 0.01")
        if threshold_method not in THRESHOLD_METHODS:
            raise BdrunError(
                f"defense.threshold_method={threshold_method!r} must be one of "
                f"{', '.join(THRESHOLD_METHODS)}"
            )
        if not 0 < float(overlay_share) < 1:
            raise BdrunError(f"defense.overlay_share={overlay_share} must be in (0, 1)")
        self.n_overlays = int(n_overlays)
        self.frr = float(frr)
        self.input_weight = float(input_weight)
        self.overlay_weight = float(overlay_weight)
        self.clip = bool(clip)
        self.threshold_method = threshold_method
        self.overlay_share = float(overlay_share)

    def detector(
        self, model: nn.Module, data: RunData, ctx: RunContext, carried: Carried = NOTHING_CARRIED
    ) -> InputDetector:
        holdout = data.holdout
        require_holdout(holdout, 2, "STRIP")
        order = torch.randperm(len(holdout), generator=ctx.generator("strip-holdout"))
        n_pool = min(max(1, round(self.overlay_share * len(holdout))), len(holdout) - 1)
        pool, calibration = holdout.x[order[:n_pool]], holdout.x[order[n_pool:]]
        detector = StripDetector(
            model,
            pool,
            self.n_overlays,
            self.input_weight,
            self.overlay_weight,
            self.clip,
            inputs_per_pass=ctx.settings.eval_batch_size // self.n_overlays,
            device=ctx.device,
            seed=ctx.seed,
        )
        boundary = detector.calibrate(
            detector.entropy(calibration), self.frr, self.threshold_method
        )
        log.info(
            "STRIP entropy boundary %.4f (%s, FRR %.3f)", boundary, self.threshold_method, self.frr
        )

        return detector
