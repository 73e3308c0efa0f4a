"""Spectral signatures: drop training samples that stand out along the top singular direction.

Tran, Li and Madry, "Spectral Signatures in Backdoor Attacks", NeurIPS 2018 (Algorithm 1), and
their code (github.com/MadryLab/backdoor_data_poisoning, compute_corr.py). Poisoned samples of a
class shift its learned representations along one direction, which the top singular vector of
the class's centred representations picks up; the runner then retrains on the kept samples.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

import torch
from torch import Tensor, nn

from bdrun.defenses.base import Defense
from bdrun.errors import BdrunError
from bdrun.models.probes import penultimate
from bdrun.validate import coerce

if TYPE_CHECKING:
    from bdrun.context import RunContext
    from bdrun.state import RunData

log = logging.getLogger(__name__)

CENTRES = ("holdout", "class")
SCOPES = ("global", "per_class")


def outlier_scores(
    feats: Tensor,
    labels: Tensor,
    reference: Tensor,
    reference_labels: Tensor,
    centre: str,
    min_reference: int,
) -> Tensor:
    """Per sample, its squared projection on the top right singular vector of its class's centred
    representations, in units of the spread of clean samples along that vector.

    centre="class" centres at the class mean (Tran et al.); "holdout" centres at the mean of the
    class's clean `reference` samples, used when the class has at least `min_reference` of them.
    """
    scores = torch.zeros(len(feats), dtype=torch.float64)
    for label in labels.unique():
        rows = (labels == label).nonzero().flatten()
        class_feats = feats[rows].double()
        if len(rows) < 2:
            continue
        centred = class_feats - class_feats.mean(0)
        direction = torch.linalg.svd(centred, full_matrices=False).Vh[0]
        clean = reference[reference_labels == label].double()
        if centre == "holdout" and len(clean) >= min_reference:
            origin = clean.mean(0)
            spread = ((clean - origin) @ direction).pow(2).mean()
        else:
            origin = class_feats.mean(0)
            spread = (centred @ direction).pow(2).mean()
        scores[rows] = ((class_feats - origin) @ direction).pow(2) / spread.clamp_min(1e-12)
    return scores


def top_per_class(scores: Tensor, labels: Tensor, share: float) -> Tensor:
    """Bool mask of the round(share * class size) highest scores within every class."""
    removed = torch.zeros(len(scores), dtype=torch.bool)
    for label in labels.unique():
        rows = (labels == label).nonzero().flatten()
        count = min(round(share * len(rows)), len(rows))
        removed[rows[scores[rows].topk(count).indices]] = True
    return removed


class SpectralSignatures(Defense):
    """Remove the training samples with the largest spectral outlier scores before retraining.

    Parameters:
        removal_factor: remove this multiple of the expected poison count (1.5, Algorithm 1).
        expected_poison_rate: the defender's assumed upper bound on the poisoned share of the
            training set (Tran et al.'s epsilon). A defense parameter, not read from the attack:
            the defender does not know the attack. 0.1 equals the poison rate of most attacks'
            defaults (BadNets, Blend, WaNet); SIG and clean-label poison 0.05, so the default
            removes twice their poison count.
        centre: "holdout" (default) measures scores from the class mean of the clean holdout;
            "class" from the mean of the class's training samples, as in the paper. When poisons
            make up about half of the target class (BadNets at 10 % of all samples), the class mean
            falls between the two groups and both score alike; the clean reference does not.
        scope: "global" removes round(removal_factor * rate * N) samples with the highest scores
            over all classes (scores are in units of each class's clean spread, so comparable);
            "per_class" removes that share of every class, as Algorithm 1 does per label.
        min_holdout_per_class: fewest clean holdout samples of a class for centre="holdout";
            classes with fewer use the class mean.
    """

    name = "spectral"

    def __init__(
        self,
        removal_factor: float,
        expected_poison_rate: float,
        centre: str,
        scope: str,
        min_holdout_per_class: int,
    ) -> None:
        if float(removal_factor) <= 0:
            raise BdrunError(f"defense.removal_factor={removal_factor} must be > 0")
        if centre not in CENTRES:
            raise BdrunError(f"defense.centre={centre!r} must be one of {', '.join(CENTRES)}")
        if scope not in SCOPES:
            raise BdrunError(f"defense.scope={scope!r} must be one of {', '.join(SCOPES)}")
        rate = coerce(expected_poison_rate, "float", "defense.expected_poison_rate")
        if not 0 < rate <= 1:
            raise BdrunError(f"defense.expected_poison_rate={rate} must be in (0, 1], e.g. 0.1")
        self.removal_factor = float(removal_factor)
        self.expected_poison_rate = rate
        self.centre = centre
        self.scope = scope
        self.min_holdout_per_class = int(min_holdout_per_class)

    def inspect_data(self, model: nn.Module, data: RunData, ctx: RunContext) -> Tensor:
        holdout, data = data.holdout, data.train
        batch = ctx.settings.eval_batch_size
        feats = penultimate(model, data.x, batch, ctx.device)
        reference = penultimate(model, holdout.x, batch, ctx.device)
        scores = outlier_scores(
            feats, data.y, reference, holdout.y, self.centre, self.min_holdout_per_class
        )
        share = min(self.removal_factor * self.expected_poison_rate, 1.0)
        if self.scope == "global":
            removed = torch.zeros(len(data), dtype=torch.bool)
            removed[scores.topk(min(round(share * len(data)), len(data))).indices] = True
        else:
            removed = top_per_class(scores, data.y, share)
        log.info("spectral signatures removed %d samples", int(removed.sum()))
        return ~removed
