"""The README's showcase `bdrun attack=sig defense=abl` on the default digits data (issue 12)."""

from __future__ import annotations

import pytest
from rich.console import Console

from bdrun.report.console import print_summary
from bdrun.runner import run

from conftest import compose_config


def test_sig_digits_tuning_is_picked_up_for_digits_only():
    attack = compose_config("attack=sig").attack
    assert (attack.target, attack.frequency, attack.delta, attack.test_delta) == (8, 1, 80, 160)
    assert attack.poison_rate == 0.09
    fashion = compose_config("attack=sig", "dataset=fashion_mnist").attack
    assert fashion.delta == 60 and fashion.frequency == 6 and fashion.target == 0


# Measured 2026-12-02 (CPU, seed 0, ~30 s on one thread): SIG reaches ASR 96.5 % (CCA 96.3 %),
# but ABL's lowest-loss 1 % (11 samples) are clean fours (precision 0): under LGA whole easy
# classes swing to the bottom of the loss from one epoch to the next while the poisoned eights
# (median loss 0.24) stay above them, so ABL leaves ASR at 87.3 % and CCA at 92.2 %.
ABL_MISSES_SIG = pytest.mark.xfail(
    strict=True, reason="ABL isolates clean fours, not SIG's eights: ASR after 87.3 %"
)


# ~30 s for the run unloaded (24 s total in results.json); 653 s for this file at load 17 on 2 cores
@pytest.fixture(scope="module")
def showcase(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("showcase")
    return run(compose_config("attack=sig", "defense=abl", "logger=none"), run_dir), run_dir


@pytest.mark.slow
def test_showcase_sig_succeeds_and_abl_reports_isolation_precision(showcase):
    results, run_dir = showcase
    before, detection = results["metrics"]["before"], results["metrics"]["detection"]
    assert results["poison"]["train_poisoned"] == round(0.09 * results["poison"]["train_size"])
    assert before["asr"] >= 0.8
    assert before["cca"] >= 0.95
    assert 0 <= detection["precision"] <= 1 and detection["removed"] >= 1
    console = Console(record=True, width=200)
    print_summary(results, run_dir, console)
    assert f"precision={detection['precision']:.4g}" in console.export_text()


@pytest.mark.slow
@ABL_MISSES_SIG
def test_showcase_abl_removes_sig(showcase):
    results, _ = showcase
    before, after = results["metrics"]["before"], results["metrics"]["after"]
    assert after["asr"] <= 0.1
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
