"""The README's showcase `bdrun attack=sig defense=abl` on the default digits data (issue 12)."""

from __future__ import annotations

import pytest
from rich.console import Console

from bdrun.report.console import print_summary
from bdrun.runner import run

from conftest import compose_config


def test_sig_digits_tuning_is_picked_up_for_digits_only():
    attack = compose_config("attack=sig").attack
    assert (attack.signal, attack.target, attack.delta, attack.test_delta) == ("ramp", 9, 255, None)
    assert attack.poison_rate == 0.09
    fashion = compose_config("attack=sig", "dataset=fashion_mnist").attack
    assert fashion.signal == "sine" and fashion.delta == 60 and fashion.target == 0


# Measured 2026-12-02 (CPU, one thread; docs/tuning/sig_digits.md and abl_digits.md have the
# search): seeds 0 / 1 / 2 give ASR 97.3 / 85.8 / 98.5 % (CCA 93.5 / 95.7 / 95.7 %); ABL isolates
# 11 poisons out of 11 on each seed. Unlearning them alone left ASR 0.0 / 0.2 / 0.0 % at CCA
# 88.1 % on each (the clean nines went with them); against the clean holdout
# (conf/tuning/defense_dataset/abl_digits.yaml) ASR 0.0 % at CCA 97.8 / 97.4 / 97.4 %. The run is
# pinned to one thread for the isolation precision: with two, float rounding changes which
# samples LGA leaves at the bottom of the loss (precision 0.27 / 0.64 / 1.0, ASR still 0.0 %).
# ~25 s for the run from an empty cache on one thread at load ~12 on 2 cores
@pytest.fixture(scope="module")
def showcase(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("showcase")
    config = compose_config("attack=sig", "defense=abl", "logger=none", "trainer.num_threads=1")
    return run(config, run_dir), run_dir


@pytest.mark.slow
def test_showcase_sig_succeeds_and_abl_isolates_poisons(showcase):
    results, run_dir = showcase
    before, detection = results["metrics"]["before"], results["metrics"]["detection"]
    assert results["poison"]["train_poisoned"] == round(0.09 * results["poison"]["train_size"])
    assert before["asr"] >= 0.8
    assert before["cca"] >= 0.93
    assert detection["removed"] >= 1 and detection["precision"] >= 0.9
    console = Console(record=True, width=200)
    print_summary(results, run_dir, console)
    assert f"precision={detection['precision']:.4g}" in console.export_text()


@pytest.mark.slow
def test_showcase_abl_removes_sig(showcase):
    results, _ = showcase
    assert results["metrics"]["after"]["asr"] <= 0.1


@pytest.mark.slow
def test_showcase_abl_keeps_clean_accuracy(showcase):
    results, _ = showcase
    before, after = results["metrics"]["before"], results["metrics"]["after"]
    assert before["cca"] - after["cca"] <= 0.05


def test_a_detection_warning_is_printed_under_the_table(tmp_path):
    results = {
        "attack": "sig",
        "defense": "abl",
        "dataset": "fashion_mnist",
        "model": "small_cnn",
        "seed": 0,
        "metrics": {
            "before": {"cca": 0.9, "asr": 1.0, "ra": 0.0},
            "after": {"cca": 0.5, "asr": 1.0, "ra": 0.0},
            "detection": {"precision": 0.0, "warnings": ["ABL: the isolated samples spread"]},
        },
        "timing": {"train_s": 1.0, "defense_s": 1.0, "total_s": 2.0},
        "cache": {"model": "hit"},
    }
    console = Console(record=True, width=200)
    print_summary(results, tmp_path, console)
    text = console.export_text()
    assert "warning: ABL: the isolated samples spread" in text
    assert "warnings=" not in text  # the list is not repeated in the detection line
