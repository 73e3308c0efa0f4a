"""Real-data fidelity (slow) of the model-repair defenses on Fashion-MNIST BadNets (small CNN).

Each test reuses the cached poisoned model of `bdrun dataset=fashion_mnist attack=badnets` (the
first run trains it, ~80 s on an idle machine). Needs Debian's dataset-fashion-mnist.
Neural Cleanse runs with 320 samples per optimisation step instead of the authors' 1000 (same
schedule and early stop, a third of the arithmetic) to keep each scan to minutes on 2 CPU cores.
"""

from __future__ import annotations

import csv
from pathlib import Path

import pytest

from conftest import needs_fashion_mnist, run_fashion_mnist

pytestmark = [
    pytest.mark.slow,
    needs_fashion_mnist,
]
NC_BUDGET = "defense.samples_per_step=320"


def read_curve(path: Path) -> list[dict[str, float]]:
    with open(path) as f:
        return [{k: float(v) for k, v in row.items()} for row in csv.DictReader(f)]


def test_pruning_curve_on_fashion_mnist_badnets(tmp_path):
    """Fine-Pruning's stages: (1) dormant channels go first with no effect on CCA or ASR;
    (3) pruning deep enough removes the backdoor and clean accuracy with it. Stage (2), where the
    backdoor dies while clean accuracy holds, does not appear on this 64-channel layer: the
    trigger is carried by channels clean inputs use too (printed, not asserted)."""
    results = run_fashion_mnist(tmp_path, "attack=badnets", "defense=prune")
    rows = read_curve(tmp_path / "pruning_curve_prune.csv")
    first = rows[0]
    assert [r["pruned"] for r in rows] == list(range(65))
    dormant = [r for r in rows if r["fraction"] <= 0.4]
    assert all(abs(r["cca"] - first["cca"]) < 0.005 for r in dormant)
    assert all(abs(r["asr"] - first["asr"]) < 0.005 for r in dormant)
    gone = [r for r in rows if r["asr"] <= 0.10]
    assert gone, "pruning everything must end the backdoor"
    print(
        f"stage 1 ends at {max(r['fraction'] for r in rows if abs(r['cca'] - first['cca']) < 0.005):.3f}; "
        f"ASR first <= 10 % at {gone[0]['fraction']:.3f} pruned with CCA {gone[0]['cca']:.4f} "
        f"(unpruned {first['cca']:.4f}); stops: {results['metrics']['detection']['prune_stops']}"
    )


def test_fine_pruning_removes_badnets_and_keeps_clean_accuracy(tmp_path):
    """One-shot fine-pruning at 90 % of conv2's channels (58 of 64), then 10 epochs of
    fine-tuning on the holdout at the training learning rate (0.05). The paper's 4 % accuracy-drop
    stop prunes only 46 channels here (ASR 96.6 % before fine-tuning); with the default
    fine-tuning lr 0.01 the 90 % prune still ends at ASR 44 % (measured 2026-11-22)."""
    results = run_fashion_mnist(
        tmp_path,
        "attack=badnets",
        "defense=fine_pruning",
        "defense.prune_ratio=0.9",
        "defense.lr=0.05",
    )
    before, after = results["metrics"]["before"], results["metrics"]["after"]
    print(f"before {before}\nafter {after}\n{results['metrics']['detection']}")
    assert before["asr"] >= 0.97
    assert after["asr"] <= 0.05
    assert after["cca"] >= before["cca"] - 0.04


def test_neural_cleanse_flags_the_badnets_target_and_unlearning_removes_it(tmp_path):
    results = run_fashion_mnist(tmp_path, "attack=badnets", "defense=neural_cleanse", NC_BUDGET)
    detection = results["metrics"]["detection"]
    before, after = results["metrics"]["before"], results["metrics"]["after"]
    print(
        f"flagged {detection['flagged_labels']}, index {detection['anomaly_index']}, "
        f"{detection['seconds_per_label']:.1f} s/label; before {before}; after {after}"
    )
    target = results["config"]["attack"]["target"]
    assert detection["model_flagged"] and target in detection["flagged_labels"]
    assert detection["anomaly_index"][target] > 2
    assert len(detection["anomaly_index"]) == 10
    assert after["asr"] <= 0.05
    assert after["cca"] >= before["cca"] - 0.04
    assert (tmp_path / "reversed_triggers.png").is_file()


def test_neural_cleanse_flags_nothing_on_a_clean_model(tmp_path):
    results = run_fashion_mnist(
        tmp_path, "attack=none", "defense=neural_cleanse", "defense.mitigation=none", NC_BUDGET
    )
    detection = results["metrics"]["detection"]
    print(f"index {detection['anomaly_index']}, l1 {detection['l1_norms']}")
    assert not detection["model_flagged"] and detection["flagged_labels"] == []
    assert detection["max_anomaly_index"] <= 2
