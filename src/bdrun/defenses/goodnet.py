"""GoodNet: the CSAW-HackML 2020 repaired network, B and a fine-pruned B' voting, N on a split."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

from bdrun.defenses.base import NOTHING_CARRIED, Carried, InputDetector, Measured
from bdrun.defenses.fine_pruning import FinePruning
from bdrun.errors import BdrunError
from bdrun.metrics import predict
from bdrun.validate import fraction

if TYPE_CHECKING:
    from bdrun.context import RunContext
    from bdrun.state import RunData

REFERENCES = ("original", "b0")


def goodnet_labels(reference: Tensor, repaired: Tensor, num_classes: int) -> Tensor:
    """GoodNet's decision rule on two label vectors: the repaired label where the two networks
    agree, class N (= num_classes, the extra "poisoned" class) where they disagree."""
    return torch.where(reference == repaired, repaired, torch.full_like(repaired, num_classes))


class Disagreement(InputDetector):
    """Rejects an input when the reference network and the repaired one label it differently.

    The runner turns a rejected input into label num_classes, which is GoodNet's class N, so
    the "after" metrics are the repaired network's: CCA counts N as wrong on clean inputs, ASR
    counts N as a failed attack.
    """

    threshold = 0.5

    def __init__(self, reference: nn.Module, repaired: nn.Module, ctx: RunContext) -> None:
        self.reference, self.repaired = reference, repaired
        self.batch_size, self.device = ctx.settings.eval_batch_size, ctx.device

    def score(self, x: Tensor) -> Tensor:
        reference = predict(self.reference, x, self.batch_size, self.device)
        return (reference != predict(self.repaired, x, self.batch_size, self.device)).float()

    def describe(self, clean: Measured, backdoor: Measured, ctx: RunContext) -> dict[str, Any]:
        """Shares of the test sets flagged as N, and B' scored on its own (figures only)."""
        alone = ctx.evaluate(self.repaired)

        def share(measured: Measured) -> float | None:
            flagged = int((measured.scores > self.threshold).sum())
            return flagged / len(measured.scores) if len(measured.scores) else None

        return {
            "flagged_clean": share(clean),
            "flagged_backdoor": share(backdoor),
            **{f"repaired_{key}": alone[key] for key in ("cca", "asr", "ra")},
        }


class GoodNet(FinePruning):
    """The CSAW-HackML 2020 repaired network G built from B (the given model) and B' (B
    fine-pruned): G(x) = B'(x) when B(x) = B'(x), else N, the extra "poisoned" class.

    CSAW-HackML 2020 (NYU, Garg et al.'s ML-security lab; backdoored DeepID nets on YouTube
    Faces): the repaired network must output the correct class for clean inputs and N for
    backdoored ones. B' comes from Fine-Pruning (Liu et al. 2018) with this defense's settings;
    a backdoored input that B' has been repaired for makes B and B' disagree. Variant
    `reference: b0` compares B' with B0, B fine-pruned by only `b0_prune_ratio` of the
    channels and fine-tuned like B': both then share the fine-tuning's clean-accuracy shifts,
    so fewer clean inputs are flagged, while B0 keeps most of the backdoor.

    B' is FinePruning's repair (GoodNet is a FinePruning with its settings: lr, epochs,
    prune_ratio, acc_drop, ...); the detector compares it with the reference.

    Parameters:
        reference: original (B) | b0.
        b0_prune_ratio: fraction of channels B0 prunes ("only a few").
    """

    def __init__(self, reference: str, b0_prune_ratio: float, **fine_pruning: Any) -> None:
        super().__init__(**fine_pruning)
        if reference not in REFERENCES:
            raise BdrunError(
                f"defense.reference={reference!r} must be one of {', '.join(REFERENCES)}"
            )
        self.reference_kind = reference
        self.b0_prune_ratio = fraction(b0_prune_ratio, "defense.b0_prune_ratio")
        # B0: fine-pruned and fine-tuned like B', by the small ratio, in one shot, no curve
        b0_settings = {**fine_pruning, "prune_ratio": self.b0_prune_ratio, "curve": False}
        self.b0 = FinePruning(**{**b0_settings, "mode": "one_shot"})

    def detector(
        self, model: nn.Module, data: RunData, ctx: RunContext, carried: Carried = NOTHING_CARRIED
    ) -> InputDetector:
        """Disagreement of B' (`model`) with B (the model the repair started from) or B0."""
        original = carried.unrepaired
        if original is None:
            raise RuntimeError("GoodNet compares B' with the model its repair stage was given")
        if self.reference_kind == "original":
            reference = original
        else:  # B0's own pruning figures are not GoodNet's
            self.b0.name = f"{self.name}_b0"
            reference = self.b0.repair(original, data, ctx.for_defense())
        ctx.record(reference=self.reference_kind)
        return Disagreement(reference, model, ctx)
