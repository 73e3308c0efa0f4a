"""The five stages a defense can act in; each is a no-op unless a defense overrides it.

The runner (bdrun.runner.run_defenses) calls them in pipeline order, each with the model it acts
on, the run's frozen data (`bdrun.state.RunData`) and a context of tools
(`bdrun.context.RunContext`: trainer, cache, logger, seeded generators, and `record` for the
defense's own figures):
1. `inspect_data` (data inspection: spectral signatures, activation clustering) returns a
   keep-mask over the poisoned training set `data.train`; the runner retrains on what is kept
   and scores the removal against the ground truth (precision, recall, removed);
2. `train` (training-time defenses: ABL) returns a model trained its own way, and the samples it
   set apart, which the runner scores like a removal;
3. `inspect_model` (model inspection: Neural Cleanse, ABS, NeuronInspect) returns a Verdict:
   flagged labels, an anomaly index per label and one model-level score;
4. `repair` (model repair: pruning, fine-tuning, Neural Cleanse unlearning) returns a repaired
   model;
5. `detector` (run-time input detectors: STRIP) returns an InputDetector calibrated on the
   holdout; the runner scores it on the test sets once, for the detection metrics and for the
   "after" figures behind it.
What a defense carries from one stage to a later one is declared in `Carried`, which the
runner fills: the Verdict of its inspection (Neural Cleanse mitigates with the triggers it
reversed) and the model its repair started from (GoodNet compares it with the repaired one).
Nothing is left on `self` between stages, and a defense's own figures go to `ctx.record`.

A defense decides with `data.holdout` (clean) and the model only; `data.train.poison`,
`data.test` and `data.backdoor_test` exist for scoring and figures
(tests/test_defense_oracle.py checks that every defense's outputs stay the same when the test
sets are noise). Defenses compose: `defense=[fine_pruning,strip]` runs each stage of each
defense in order.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

from bdrun.errors import BdrunError

if TYPE_CHECKING:
    from bdrun.context import RunContext
    from bdrun.data.base import ImageSet
    from bdrun.state import RunData


def require_holdout(holdout: ImageSet, minimum: int, who: str) -> None:
    """A one-line user error when the clean holdout has fewer than `minimum` images."""
    if len(holdout) < minimum:
        raise BdrunError(
            f"{who} needs at least {minimum} clean holdout images but the holdout has "
            f"{len(holdout)}; raise dataset.holdout_fraction (or dataset.max_holdout)"
        )


@dataclass(frozen=True)
class Verdict:
    """A model inspector's conclusion about one model.

    flagged_labels: the labels it calls backdoor targets, most anomalous first (empty: the
        model is called clean).
    anomaly_index: one value per label on the inspector's own scale (Neural Cleanse and
        NeuronInspect: the MAD anomaly index; ABS: the label's best REASR).
    score: one model-level value, higher = more likely backdoored, comparable across models
        inspected the same way; a population benchmark ranks models by it (AUROC).
    evidence: what the defense's own later stages use (Neural Cleanse's reversed triggers);
        never written to results.json.
    """

    flagged_labels: list[int]
    anomaly_index: list[float]
    score: float
    evidence: Any = field(default=None, repr=False, compare=False)

    @property
    def model_flagged(self) -> bool:
        return bool(self.flagged_labels)

    def metrics(self) -> dict[str, Any]:
        """The standard keys of `metrics.detection` for a model inspector (DESIGN.md)."""
        return {
            "model_flagged": self.model_flagged,
            "flagged_labels": list(self.flagged_labels),
            "anomaly_index": list(self.anomaly_index),
            "max_anomaly_index": max(self.anomaly_index) if self.anomaly_index else None,
            "score": self.score,
        }


@dataclass(frozen=True)
class Carried:
    """What a defense's earlier stages hand to its later ones in one run (filled by the runner).

    verdict: this defense's inspect_model result (None when it inspects no model).
    unrepaired: the model this defense's repair stage was given (None before that stage).
    """

    verdict: Verdict | None = None
    unrepaired: nn.Module | None = None


NOTHING_CARRIED = Carried()


@dataclass(frozen=True)
class Trained:
    """What a training-time defense returns: its model, and a bool mask over the training set it
    was given of the samples it set apart (ABL's isolated samples; None when it sets none
    apart), which the runner scores against the ground-truth poison mask."""

    model: nn.Module
    set_apart: Tensor | None = None


@dataclass(frozen=True)
class Measured:
    """An input detector's view of a batch of inputs: one score per input (higher = more likely
    to carry a trigger) and, keyed by name, the per-input values behind it (SentiNet's
    confidence and fooled share, NIC's invariant values) for the detector's figures."""

    scores: Tensor
    parts: dict[str, Tensor] = field(default_factory=dict)


def frr_threshold(clean_scores: Tensor, frr: float) -> float:
    """The threshold (an input scoring above it is rejected) that rejects a share `frr` of clean
    inputs: the empirical (1 - frr) quantile of their scores. Clean scores tied at it are all
    kept, so scores that pile up on one value can reject fewer (`tied_at_top`)."""
    return float(torch.quantile(clean_scores.double(), 1 - frr))


def tied_at_top(clean_scores: Tensor, threshold: float, frr: float) -> float | None:
    """The share of clean scores tied at `threshold` when that tie leaves the threshold
    rejecting no clean input although `frr` asks for some (the highest score is the threshold);
    else None."""
    if bool((clean_scores > threshold).any()):
        return None
    tied = float((clean_scores == threshold).double().mean())
    return tied if tied > frr else None


def calibrate_on_holdout(
    detector: InputDetector, clean_scores: Tensor, frr: float, ctx: RunContext, who: str
) -> float:
    """Calibrate `detector` for a false rejection rate `frr` on the clean holdout's scores, and
    record a warning under the run's summary when a tie at the top score leaves the threshold
    rejecting no input (`tied_at_top`): detectors whose score takes a few values only (SCALE-UP,
    IBD-PSC) can land there."""
    threshold = detector.calibrate(clean_scores, frr)
    tied = tied_at_top(clean_scores, threshold, frr)
    if tied is not None:
        ctx.record(
            warnings=[
                f"{who}: {100 * tied:.1f} % of the clean holdout tie at the top score "
                f"{threshold:g}, so the threshold for defense.frr={frr:g} rejects no input; a "
                f"defense.frr above {tied:.3f} lets it reject"
            ]
        )
    return threshold


class InputDetector:
    """A run-time filter calibrated on clean holdout data: inputs whose score exceeds
    `threshold` are rejected.

    The runner measures the clean and the backdoor test sets once each (`measure`), computes the
    detection metrics from those scores, rejects the same inputs when it scores the model behind
    the detector, and asks `describe` for the detector's own figures (histograms, per-part
    AUROC). Any other input is scored with `score`.
    """

    threshold: float = float("inf")

    def score(self, x: Tensor) -> Tensor:
        raise NotImplementedError

    def measure(self, x: Tensor) -> Measured:
        """Scores of x with the values behind them (default: the scores alone)."""
        return Measured(self.score(x))

    def rejects(self, x: Tensor) -> Tensor:
        return self.score(x) > self.threshold

    def calibrate(self, clean_scores: Tensor, frr: float) -> float:
        """Set `threshold` to reject a share `frr` of clean inputs (`frr_threshold`)."""
        self.threshold = frr_threshold(clean_scores, frr)
        return self.threshold

    def describe(self, clean: Measured, backdoor: Measured, ctx: RunContext) -> dict[str, Any]:
        """Figures of this detector on the clean and backdoor test sets (plain JSON values),
        beyond the standard detection metrics; plots go to ctx.run_dir / ctx.logger."""
        return {}


class Defense:
    """Base class; `name` is set from the config (see bdrun.runner.build_defenses)."""

    name = "defense"

    def inspect_data(self, model: nn.Module, data: RunData, ctx: RunContext) -> Tensor | None:
        """A bool keep-mask over `data.train` (the poisoned training set), from the poisoned
        `model`, or None to keep everything."""
        return None

    def train(self, train_set: ImageSet, data: RunData, ctx: RunContext) -> Trained | None:
        """A model trained the defense's way on `train_set` (data.train less what inspectors
        removed), or None for standard training."""
        return None

    def inspect_model(self, model: nn.Module, data: RunData, ctx: RunContext) -> Verdict | None:
        """A verdict on `model` (is it backdoored, which labels), or None."""
        return None

    def repair(
        self, model: nn.Module, data: RunData, ctx: RunContext, carried: Carried = NOTHING_CARRIED
    ) -> nn.Module:
        """A repaired copy of `model` (never modify the argument: it is the cached model);
        `carried.verdict` is this defense's own inspect_model result."""
        return model

    def detector(
        self, model: nn.Module, data: RunData, ctx: RunContext, carried: Carried = NOTHING_CARRIED
    ) -> InputDetector | None:
        """A detector guarding `model` (the repaired one), calibrated on clean holdout data, or
        None; `carried` holds this defense's verdict and the model its repair started from."""
        return None


class NoDefense(Defense):
    """The undefended baseline: after == before."""

    name = "none"
