"""What every attack shares: target labels, sample selection, poisoning, the backdoor test set.

Definitions used throughout bdrun:
- poison rate = poisoned training samples / all training samples (clean-label attacks too);
- the backdoor test set holds test inputs whose true label differs from their backdoor label,
  with the trigger applied; ASR is the share classified as the backdoor label, RA the share
  classified as the true label.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

from bdrun.data.base import DataInfo, ImageSet, to_float, to_storage
from bdrun.errors import BdrunError

if TYPE_CHECKING:
    from bdrun.context import RunContext
    from bdrun.state import RunData

LABEL_MODES = ("all2one", "all2all")


def draw_mask(candidates: Tensor, count: int, size: int, g: torch.Generator) -> Tensor:
    """Bool mask over `size` samples with `count` of the `candidates` (indices) drawn with g."""
    chosen = candidates[torch.randperm(len(candidates), generator=g)[:count]]
    mask = torch.zeros(size, dtype=torch.bool)
    mask[chosen] = True
    return mask


class Attack:
    """Base class. A data-time attack implements `apply_trigger` (batched, pure) and nothing else.

    Parameters:
        target: the backdoor label for all-to-one attacks.
        poison_rate: fraction of *all* training samples that get poisoned, in (0, 1] (0 where
            `poisons_data` is False).
        label_mode: "all2one" (every triggered input -> target) or "all2all" (y -> (y+1) mod C).
    Values come from the attack's YAML (conf/attack/); an attack for which one of them is no
    setting (a clean-label attack is all-to-one) passes it itself.
    """

    name = "attack"
    #: False where backdoor inputs carry no trigger of this attack's making: a clean baseline,
    #: a subpopulation (membership is the key), files poisoned elsewhere (pretrained)
    stamps_inputs = True
    #: True where poisoned training images get their trigger inside the training loop
    #: (input-aware's generator), so the stored poisoned rows still look clean
    triggers_in_training = False
    #: True where the attack poisons only target-class samples and keeps every label (SIG,
    #: Turner et al.'s label-consistent attack)
    clean_label = False
    #: after `poison`: bool mask over the training set of the samples that carry (part of) a
    #: trigger yet keep their true label (Qi et al.'s regularisation, or "cover", samples); None
    #: where the attack makes none. They are not poisoned: the poison mask, the poison rate and
    #: a filter's precision and recall count them as clean samples (the authors' accounting);
    #: the runner reports how many a filter removed (`cover_removed`).
    cover: Tensor | None = None
    #: False where no training row is poisoned at all and poison_rate is 0 by construction
    #: (blind: the attack is in the loss computation, a training hook)
    poisons_data = True

    def __init__(self, target: int, poison_rate: float, label_mode: str) -> None:
        self.target = int(target)
        self.poison_rate = float(poison_rate)
        self.label_mode = label_mode
        self.info: DataInfo | None = None

    # -- set-up -----------------------------------------------------------------------------
    def setup(self, info: DataInfo, seed: int) -> None:
        """Check the parameters against the data and build any trigger tensors for its shape."""
        self.info = info
        if self.poisons_data and not 0 < self.poison_rate <= 1:
            raise BdrunError(f"attack.poison_rate={self.poison_rate} must be in (0, 1]")
        if self.label_mode not in LABEL_MODES:
            raise BdrunError(
                f"attack.label_mode={self.label_mode!r} must be one of {', '.join(LABEL_MODES)}"
            )
        if not 0 <= self.target < info.num_classes:
            raise BdrunError(
                f"attack.target={self.target} is outside the {info.num_classes} classes of {info.name} "
                f"(use 0..{info.num_classes - 1})"
            )
        if self.clean_label and self.label_mode != "all2one":
            raise BdrunError("clean-label attacks need attack.label_mode=all2one")

    def fit(self, clean_train: ImageSet, test: ImageSet, ctx: RunContext) -> None:
        """Learn what the attack needs from the clean training data before poisoning (`test` is
        the clean test set, for attacks that pick test inputs, such as a subpopulation).

        Attacks built on a model of the clean data (label-consistent PGD's surrogate,
        subpopulation clustering) train it here with `ctx.train_cached`, so it is cached like
        any other model. The default does nothing.
        """

    # -- labels and selection ----------------------------------------------------------------
    @property
    def num_classes(self) -> int:
        assert self.info is not None, "call setup() first"
        return self.info.num_classes

    def backdoor_label(self, y: Tensor) -> Tensor:
        """The label a triggered input with true label y should be classified as."""
        if self.label_mode == "all2all":
            return (y + 1) % self.num_classes
        return torch.full_like(y, self.target)

    def eligible(self, y: Tensor) -> Tensor:
        """Training samples the attack may poison: target class for clean-label, else non-target
        (all-to-one) or everything (all-to-all)."""
        if self.clean_label:
            return y == self.target
        return self.backdoor_label(y) != y

    def poison_count(self, n: int) -> int:
        """How many of n training samples `select` poisons: round(poison_rate * n)."""
        return round(self.poison_rate * n)

    def select(self, y: Tensor, g: torch.Generator) -> Tensor:
        """Bool mask of exactly poison_count(len(y)) eligible samples, drawn with g."""
        candidates = self.eligible(y).nonzero().flatten()
        count = self.poison_count(len(y))
        if count > len(candidates):
            kind = "target-class" if self.clean_label else "eligible"
            raise BdrunError(
                f"attack.poison_rate={self.poison_rate} needs {count} {kind} training samples "
                f"but only {len(candidates)} exist; lower the rate"
            )
        return draw_mask(candidates, count, len(y), g)

    # -- triggers ------------------------------------------------------------------------------
    def apply_trigger(self, x: Tensor) -> Tensor:
        """Batched trigger: float [N, C, H, W] in [0, 1] -> same shape and range. Must be pure."""
        raise NotImplementedError

    def trigger_region(self) -> Tensor | None:
        """Bool mask [1, H, W] of the pixels the trigger may change (a patch), or None (the
        default) when it may change any pixel (blend, SIG, warping, generated triggers, PGD)."""
        return None

    def poison_images(self, x: Tensor, y: Tensor) -> Tensor:
        """Poisoned versions of training images x (labels y); defaults to the test-time trigger.

        Attacks whose training images differ from test inputs (blend with a train alpha, label-
        consistent adversarial perturbations) override this.
        """
        return self.apply_trigger(x)

    def triggered(self, x: Tensor, fn: Any = None) -> Tensor:
        """Apply a float trigger function to stored images, keeping their dtype."""
        fn = fn or self.apply_trigger
        return to_storage(fn(to_float(x)).clamp_(0, 1), like=x)

    # -- data -----------------------------------------------------------------------------------
    def poison(self, train: ImageSet, g: torch.Generator) -> ImageSet:
        """The poisoned training set: selected samples triggered (and relabelled if dirty-label)."""
        mask = self.select(train.y, g)
        x, y = train.x.clone(), train.y.clone()
        if mask.any():
            chosen_y = train.y[mask]
            x[mask] = self.triggered(train.x[mask], lambda xf: self.poison_images(xf, chosen_y))
            if not self.clean_label:
                y[mask] = self.backdoor_label(chosen_y)
        return train.replace(x=x, y=y, poison=mask, orig_y=train.orig_y.clone())

    def backdoor_test(self, test: ImageSet) -> ImageSet:
        """Test inputs whose backdoor label differs from their true label, triggered and labelled
        with the backdoor label (orig_y keeps the truth, for RA)."""
        keep = self.backdoor_label(test.y) != test.y
        subset = test.subset(keep)
        return subset.replace(
            x=self.triggered(subset.x),
            y=self.backdoor_label(subset.y),
            poison=torch.ones(len(subset), dtype=torch.bool),
            orig_y=subset.y.clone(),
        )

    # -- models supplied and figures reported by the attack ---------------------------------
    def pretrained(self, poisoned_train: ImageSet, ctx: RunContext) -> nn.Module | None:
        """The poisoned model when the attacker makes it another way than standard training on
        `poisoned_train` (a third-party BadNet, pruning-aware retraining); None (the default)
        means bdrun trains it."""
        return None

    def after_training(self, test: ImageSet, ctx: RunContext) -> None:
        """Called once the poisoned model exists (trained, loaded from the cache or supplied),
        before `backdoor_test` builds the backdoor test set: attacks whose trigger is learned
        together with the model (input-aware's generator, restored with the model's cache
        entry) freeze it here. The default does nothing."""

    def evaluate(
        self, predict_fn: Callable[[Tensor], Tensor], data: RunData, ctx: RunContext
    ) -> dict[str, float]:
        """Attack-specific figures for the metrics table (per-trigger ASR, cross-trigger
        accuracy, subpopulation damage), from a function mapping images to predicted labels
        (rejected inputs get label num_classes) and the run's frozen data. Called for the model
        before and after the defense; the default adds nothing."""
        return {}

    # -- training-time attacks ------------------------------------------------------------------
    def training_hooks(self) -> list[Any]:
        """Hooks that act on each training batch (WaNet, input-aware); none for data-time attacks."""
        return []


class NoAttack(Attack):
    """The clean baseline: nothing is poisoned; ASR is measured with no trigger at all."""

    name = "none"
    stamps_inputs = False

    def __init__(self, target: int) -> None:
        """`target`: the label whose natural rate among non-target inputs is the ASR."""
        super().__init__(target=target, poison_rate=0.0, label_mode="all2one")

    def setup(self, info: DataInfo, seed: int) -> None:
        self.info = info

    def select(self, y: Tensor, g: torch.Generator) -> Tensor:
        return torch.zeros(len(y), dtype=torch.bool)

    def apply_trigger(self, x: Tensor) -> Tensor:
        return x
