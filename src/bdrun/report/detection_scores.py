"""Scoring a model inspector over a population of models (pure functions on arrays).

Positives are backdoored models, negatives clean ones; a score is the inspector's model-level
`score` (higher = more likely backdoored).

- AUROC: bdrun.metrics.auroc (ties count one half); its 95 % interval is the percentile
  bootstrap over `resamples` draws of the clean and of the backdoored models, each resampled
  with replacement within its own group (so every draw holds both), from a numpy generator
  seeded with `seed`.
- TPR at 5 % FPR: bdrun.metrics.tpr_at_fpr.
- Cross-entropy (TrojAI's measure): the mean binary cross-entropy of probabilities from the
  scores. A score is no probability, so a logistic calibration p = sigmoid(a * score + b) is
  fitted on the calibration half of the models and the cross-entropy measured on the other
  half (`calibration_split`: half of each label, drawn with `seed`). Probabilities are clipped
  to [1e-12, 1 - 1e-12].
- Target-label accuracy: among backdoored models the inspector flags, the share whose first
  flagged label (the most anomalous) is the attack's target.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch

from bdrun.metrics import auroc, tpr_at_fpr

CLIP = 1e-12


def split_scores(scores: Sequence[float], labels: Sequence[int]) -> tuple[np.ndarray, np.ndarray]:
    """(clean scores, backdoored scores) as float64 arrays."""
    scores, labels = np.asarray(scores, dtype=np.float64), np.asarray(labels, dtype=bool)
    return scores[~labels], scores[labels]


def roc_auc(scores: Sequence[float], labels: Sequence[int]) -> float:
    """AUROC of backdoored (label 1) against clean (label 0) models; NaN without both."""
    clean, backdoored = split_scores(scores, labels)
    return auroc(torch.from_numpy(clean), torch.from_numpy(backdoored))


def tpr_at_5(scores: Sequence[float], labels: Sequence[int], max_fpr: float = 0.05) -> float:
    """The largest TPR whose FPR is at most `max_fpr`; NaN without both labels."""
    clean, backdoored = split_scores(scores, labels)
    return tpr_at_fpr(torch.from_numpy(clean), torch.from_numpy(backdoored), max_fpr)


def bootstrap_auroc(
    scores: Sequence[float],
    labels: Sequence[int],
    resamples: int = 1000,
    seed: int = 0,
    level: float = 0.95,
) -> tuple[float, float]:
    """The percentile bootstrap interval of the AUROC (module docstring); (NaN, NaN) without
    both labels. The same seed gives the same interval."""
    clean, backdoored = split_scores(scores, labels)
    if len(clean) == 0 or len(backdoored) == 0 or resamples < 1:
        return math.nan, math.nan
    # wins[i, j]: backdoored model i against clean model j (1 above, 1/2 tied, 0 below)
    wins = (backdoored[:, None] > clean[None, :]) + 0.5 * (backdoored[:, None] == clean[None, :])
    rng = np.random.default_rng(seed)
    rows = rng.integers(0, len(backdoored), size=(resamples, len(backdoored)))
    cols = rng.integers(0, len(clean), size=(resamples, len(clean)))
    # the mean over the resampled pairs = row counts x wins x column counts
    row_counts = np.stack([np.bincount(r, minlength=len(backdoored)) for r in rows])
    col_counts = np.stack([np.bincount(c, minlength=len(clean)) for c in cols])
    values = np.einsum("bi,ij,bj->b", row_counts, wins, col_counts) / (len(backdoored) * len(clean))
    tail = (1 - level) / 2
    low, high = np.quantile(values, [tail, 1 - tail])
    return float(low), float(high)


def calibration_split(labels: Sequence[int], seed: int) -> np.ndarray:
    """A bool mask of the calibration half: half (rounded up) of each label's models, drawn with
    a numpy generator seeded with `seed`; the rest is the evaluation half."""
    labels = np.asarray(labels, dtype=bool)
    rng = np.random.default_rng(seed)
    mask = np.zeros(len(labels), dtype=bool)
    for value in (False, True):
        members = np.flatnonzero(labels == value)
        chosen = rng.permutation(members)[: math.ceil(len(members) / 2)]
        mask[chosen] = True
    return mask


def fit_calibration(scores: Sequence[float], labels: Sequence[int]) -> tuple[float, float] | None:
    """(a, b) of the logistic calibration sigmoid(a * score + b) fitted by maximum likelihood
    (scikit-learn, no penalty); None without both labels."""
    from sklearn.linear_model import LogisticRegression

    x = np.asarray(scores, dtype=np.float64).reshape(-1, 1)
    y = np.asarray(labels, dtype=int)
    if len(set(y.tolist())) < 2:
        return None
    model = LogisticRegression(C=np.inf, max_iter=1000).fit(x, y)
    return float(model.coef_[0, 0]), float(model.intercept_[0])


def calibrated(scores: Sequence[float], calibration: tuple[float, float]) -> np.ndarray:
    a, b = calibration
    z = a * np.asarray(scores, dtype=np.float64) + b
    return 1 / (1 + np.exp(-np.clip(z, -700, 700)))


def cross_entropy(probabilities: Sequence[float], labels: Sequence[int]) -> float:
    """Mean binary cross-entropy (natural log), probabilities clipped to [1e-12, 1 - 1e-12];
    NaN for no models."""
    p = np.clip(np.asarray(probabilities, dtype=np.float64), CLIP, 1 - CLIP)
    y = np.asarray(labels, dtype=np.float64)
    if len(y) == 0:
        return math.nan
    return float(-np.mean(y * np.log(p) + (1 - y) * np.log(1 - p)))


def target_accuracy(
    flagged_labels: Sequence[Sequence[int]],
    targets: Sequence[int | None],
    backdoored: Sequence[int],
) -> tuple[float, int]:
    """(share of the flagged backdoored models whose first flagged label is the target, how many
    were flagged); NaN when none was."""
    hits = flagged = 0
    for labels, target, positive in zip(flagged_labels, targets, backdoored, strict=True):
        if not positive or not labels:
            continue
        flagged += 1
        hits += int(target is not None and int(labels[0]) == int(target))
    return (hits / flagged if flagged else math.nan), flagged
