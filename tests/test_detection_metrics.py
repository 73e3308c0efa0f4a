"""Detection metrics against hand-computed values."""

from __future__ import annotations

import math

import torch

from bdrun.metrics import (
    auroc,
    input_detection_metrics,
    per_class_rows,
    removal_metrics,
    tpr_at_fpr,
)


def test_input_detection_metrics_by_hand():
    clean = torch.tensor([0.0, 1.0, 2.0, 3.0])
    trojan = torch.tensor([2.5, 4.0, 5.0, 0.5])
    m = input_detection_metrics(clean, trojan, threshold=2.2)
    assert m["frr"] == 1 / 4  # 3.0 is rejected
    assert m["far"] == 1 / 4  # 0.5 is accepted
    assert m["threshold"] == 2.2
    # pairs (trojan > clean): 2.5 beats 3 clean, 4 and 5 beat 4 each, 0.5 beats 1 -> 12 of 16
    assert math.isclose(m["auroc"], 12 / 16, abs_tol=1e-6)
    # at FPR 0 (no clean above the cut) at most 4.0 and 5.0 are caught; at 1 % and 5 % as well
    assert m["tpr_at_fpr_1"] == 0.5 and m["tpr_at_fpr_5"] == 0.5


def test_tpr_at_fpr_counts_an_exact_one_percent():
    clean = torch.arange(100, dtype=torch.float64)  # 0..99
    trojan = torch.tensor([98.5, 50.0])
    # a cut just below 98.5 rejects one clean input (99): FPR exactly 1 % catches 98.5
    assert tpr_at_fpr(clean, trojan, 0.01) == 0.5
    assert tpr_at_fpr(clean, trojan, 0.0) == 0.0
    assert tpr_at_fpr(clean, trojan, 0.5) == 1.0
    assert auroc(clean, torch.tensor([100.0])) == 1.0


def test_empty_sets_give_nan():
    m = input_detection_metrics(torch.empty(0), torch.tensor([1.0]), 0.0)
    assert math.isnan(m["frr"]) and math.isnan(m["auroc"])


def test_removal_metrics_and_per_class_rows():
    poison = torch.tensor([True, True, False, False, False])
    removed = torch.tensor([True, False, True, False, False])
    assert removal_metrics(removed, poison) == {"precision": 0.5, "recall": 0.5, "removed": 2}
    none_removed = removal_metrics(torch.zeros(5, dtype=torch.bool), poison)
    assert math.isnan(none_removed["precision"]) and none_removed["recall"] == 0.0
    labels = torch.tensor([0, 0, 1, 1, 1])
    columns, rows = per_class_rows(labels, removed, poison)
    assert columns[0] == "label"
    assert rows == [[0, 2, 1, 2, 1], [1, 3, 1, 0, 0]]
