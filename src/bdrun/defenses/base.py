"""The four stages a defense can act in; each is a no-op unless a defense overrides it.

The runner calls them in pipeline order, each with the model it acts on, the run's frozen data
(`bdrun.state.RunData`) and a context of tools (`bdrun.context.RunContext`: trainer, cache,
scorer, logger, seeded generators):
1. `inspect_data` (data-inspection defenses: spectral signatures, activation clustering)
   returns a keep-mask over the poisoned training set `data.train`;
2. `train` (training-time defenses: ABL) returns a model trained its own way;
3. `repair` (model-repair defenses: pruning, fine-tuning, Neural Cleanse unlearning) returns a
   repaired model;
4. `detector` (run-time input detectors: STRIP) returns a calibrated InputDetector.
A defense decides with `data.holdout` (clean) and the model only; `data.train.poison`,
`data.test` and `data.backdoor_test` are ground truth for its figures and scores.
Defenses compose: `defense=[fine_pruning,strip]` runs each stage of each defense in order.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

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


class InputDetector:
    """A run-time filter: `score` is higher for inputs more likely to carry a trigger, and inputs
    scoring above `threshold` are rejected."""

    threshold: float = float("inf")

    def score(self, x: Tensor) -> Tensor:
        raise NotImplementedError

    def remember(self, x: Tensor, scores: Tensor) -> None:
        """Keep the scores of tensor x (this very object): a detector that scored the test sets
        for its figures is not run on them again when the runner evaluates behind it."""
        self.__dict__.setdefault("_remembered", []).append((x, scores))

    def known_score(self, x: Tensor) -> Tensor:
        """`score(x)`, or the remembered scores when x is a tensor passed to `remember`."""
        for known, scores in self.__dict__.get("_remembered", []):
            if known is x:
                return scores
        return self.score(x)

    def rejects(self, x: Tensor) -> Tensor:
        return self.known_score(x) > self.threshold


class Defense:
    """Base class; `name` is set from the config (see bdrun.config.build)."""

    name = "defense"

    def inspect_data(self, model: nn.Module, data: RunData, ctx: RunContext) -> Tensor | None:
        """A bool keep-mask over `data.train` (the poisoned training set), from the poisoned
        `model`, or None to keep everything."""
        return None

    def train(self, train_set: ImageSet, data: RunData, ctx: RunContext) -> nn.Module | None:
        """A model trained the defense's way on `train_set` (data.train less what inspectors
        removed), or None for standard training."""
        return None

    def repair(self, model: nn.Module, data: RunData, ctx: RunContext) -> nn.Module:
        """A repaired copy of `model` (never modify the argument: it is the cached model)."""
        return model

    def detector(self, model: nn.Module, data: RunData, ctx: RunContext) -> InputDetector | None:
        """A detector calibrated on clean holdout data, or None."""
        return None

    def report(self) -> dict[str, Any]:
        """Extra figures this defense wants in results.json under metrics.detection (plain
        JSON values: numbers, strings, booleans, lists, dicts)."""
        return {}


class NoDefense(Defense):
    """The undefended baseline: after == before."""

    name = "none"
