"""The population scoring maths (bdrun.report.detection_scores) against sklearn and by hand."""

from __future__ import annotations

import math

import numpy as np
import pytest
from sklearn.metrics import roc_auc_score

from bdrun.report import detection_scores as ds

SCORES = [0.1, 0.4, 0.35, 0.8, 0.7, 0.2, 0.9, 0.35, 0.05, 0.6]
LABELS = [0, 0, 1, 1, 1, 0, 1, 0, 0, 1]


def test_auroc_matches_sklearn_ties_included():
    assert ds.roc_auc(SCORES, LABELS) == pytest.approx(roc_auc_score(LABELS, SCORES))
    assert math.isnan(ds.roc_auc([0.1, 0.2], [0, 0]))


def test_tpr_at_5_percent_fpr_by_hand():
    # clean 0.05 0.1 0.2 0.35 0.4; no clean model may score above the threshold (1/5 > 5 %):
    # backdoored above 0.4: 0.6 0.7 0.8 0.9 -> 4 of 5
    assert ds.tpr_at_5(SCORES, LABELS) == pytest.approx(0.8)


def test_bootstrap_interval_is_deterministic_and_brackets_the_estimate():
    first = ds.bootstrap_auroc(SCORES, LABELS, 500, seed=3)
    assert first == ds.bootstrap_auroc(SCORES, LABELS, 500, seed=3)
    low, high = first
    assert 0 <= low <= ds.roc_auc(SCORES, LABELS) <= high <= 1
    # one resample of every model once would be the plain AUROC: a perfect ranking stays 1
    assert ds.bootstrap_auroc([0, 0, 1, 1], [0, 0, 1, 1], 200, 0) == (1.0, 1.0)


def test_bootstrap_matches_a_plain_loop():
    rng = np.random.default_rng(7)
    clean = np.array([s for s, y in zip(SCORES, LABELS, strict=True) if not y])
    backdoored = np.array([s for s, y in zip(SCORES, LABELS, strict=True) if y])
    rows = rng.integers(0, len(backdoored), size=(50, len(backdoored)))
    cols = rng.integers(0, len(clean), size=(50, len(clean)))
    values = [
        roc_auc_score([0] * len(c) + [1] * len(r), [*clean[c], *backdoored[r]])
        for r, c in zip(rows, cols, strict=True)
    ]
    expected = tuple(np.quantile(values, [0.025, 0.975]))
    assert ds.bootstrap_auroc(SCORES, LABELS, 50, seed=7) == pytest.approx(expected)


def test_calibration_split_takes_half_of_each_label_from_the_seed():
    labels = [0] * 7 + [1] * 5
    mask = ds.calibration_split(labels, seed=1)
    assert mask.sum() == 4 + 3
    assert (mask[:7].sum(), mask[7:].sum()) == (4, 3)
    assert (mask == ds.calibration_split(labels, seed=1)).all()
    assert not (mask == ds.calibration_split(labels, seed=2)).all()


def test_cross_entropy_by_hand_and_calibration_ranks_like_the_scores():
    assert ds.cross_entropy([0.5, 0.5], [0, 1]) == pytest.approx(math.log(2))
    assert ds.cross_entropy([0.9, 0.2], [1, 0]) == pytest.approx(
        -(math.log(0.9) + math.log(0.8)) / 2
    )
    assert ds.cross_entropy([0.0], [1]) == pytest.approx(-math.log(1e-12))
    a, b = ds.fit_calibration(SCORES, LABELS)
    assert a > 0  # higher score, higher probability of a backdoor
    p = ds.calibrated(SCORES, (a, b))
    assert ds.cross_entropy(p, LABELS) < math.log(2)  # better than a coin
    assert ds.fit_calibration([0.1, 0.2], [1, 1]) is None


def test_target_accuracy_counts_flagged_backdoored_models_only():
    flagged = [[3], [1, 3], [], [2], [5]]
    targets = [3, 3, 4, None, 5]
    backdoored = [1, 1, 1, 0, 1]
    # flagged backdoored: 3 (hit), [1,3] (first is 1: miss), 5 (hit); clean [2] ignored
    assert ds.target_accuracy(flagged, targets, backdoored) == (pytest.approx(2 / 3), 3)
    accuracy, count = ds.target_accuracy([[]], [1], [1])
    assert math.isnan(accuracy) and count == 0
