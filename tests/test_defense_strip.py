"""STRIP: entropy by hand, batching, calibration, end-to-end runs, and (slow) Fashion-MNIST."""

from __future__ import annotations

import json
import math

import pytest
import torch
from torch import nn

from bdrun.config import component
from bdrun.defenses.strip import HISTOGRAM_FILE, StripDetector
from bdrun.errors import BdrunError
from bdrun.runner import run

from conftest import compose_config, needs_fashion_mnist, run_bdrun

DIGITS = ("logger=none", "train.epochs=8")


class FixedLogits(nn.Module):
    """Ignores the input: always the same logits."""

    def __init__(self, logits: list[float]) -> None:
        super().__init__()
        self.logits = torch.tensor(logits)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.logits.expand(len(x), -1)


class MeanPixelVote(nn.Module):
    """Two classes, logit difference proportional to the mean pixel (blends change the output)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        m = x.flatten(1).mean(1, keepdim=True)
        return torch.cat([8 * m, 8 * (1 - m)], 1)


def detector(model: nn.Module, pool: torch.Tensor, per_pass: int = 4, n: int = 8) -> StripDetector:
    return StripDetector(model, pool, n, 1.0, 1.0, True, per_pass, "cpu", seed=0)


def test_entropy_by_hand():
    pool = torch.rand(10, 1, 4, 4)
    x = torch.rand(5, 1, 4, 4)
    uniform = detector(FixedLogits([0.0, 0.0, 0.0, 0.0]), pool).entropy(x)
    assert torch.allclose(uniform, torch.full((5,), 2.0))  # log2(4) bits
    certain = detector(FixedLogits([50.0, 0.0, 0.0, 0.0]), pool).entropy(x)
    assert torch.all(certain.abs() < 1e-6)
    p = torch.softmax(torch.tensor([1.0, 0.0]), 0)
    expected = float(-(p * p.log2()).sum())
    assert torch.allclose(
        detector(FixedLogits([1.0, 0.0]), pool).entropy(x), torch.tensor(expected)
    )


def test_scores_do_not_depend_on_batching_and_repeat():
    pool = torch.rand(30, 1, 6, 6)
    x = torch.rand(7, 1, 6, 6)
    one = detector(MeanPixelVote(), pool, per_pass=1).score(x)
    many = detector(MeanPixelVote(), pool, per_pass=100).score(x)
    assert torch.allclose(one, many, atol=1e-6)
    assert torch.equal(
        detector(MeanPixelVote(), pool).score(x), detector(MeanPixelVote(), pool).score(x)
    )
    assert one.std() > 0  # the blends really differ per input


def test_calibration_rejects_the_preset_share():
    d = detector(MeanPixelVote(), torch.rand(4, 1, 2, 2))
    entropies = torch.linspace(0.0, 1.0, 1001)
    boundary = d.calibrate(entropies, 0.05, "quantile")
    assert math.isclose(boundary, 0.05, abs_tol=1e-9)
    assert math.isclose(float((-entropies > d.threshold).double().mean()), 0.05, abs_tol=0.002)
    normal = torch.distributions.Normal(0.5, 0.1).icdf(torch.tensor(0.01))
    values = 0.5 + 0.1 * torch.randn(20000, generator=torch.Generator().manual_seed(0))
    assert abs(d.calibrate(values, 0.01, "normal") - float(normal)) < 0.01


@pytest.mark.parametrize(
    "kwargs", [{"frr": 0.0}, {"frr": 1.5}, {"n_overlays": 0}, {"threshold_method": "median"}]
)
def test_bad_settings_are_user_errors(kwargs):
    with pytest.raises(BdrunError):
        component("defense", "strip", **kwargs)


def test_strip_on_digits_rejects_trojaned_inputs(tmp_path):
    results = run(compose_config("defense=strip", *DIGITS), tmp_path)
    detection = results["metrics"]["detection"]
    for key in ("auroc", "frr", "far", "tpr_at_fpr_1", "tpr_at_fpr_5", "threshold"):
        assert key in detection
    assert detection["auroc"] > 0.95
    before, after = results["metrics"]["before"], results["metrics"]["after"]
    # a rejected trojaned input counts as defended; clean inputs lose at most the rejected share
    assert after["asr"] <= detection["far"] + 1e-9 < before["asr"]
    assert after["cca"] >= before["cca"] - detection["frr"] - 1e-9
    assert (tmp_path / HISTOGRAM_FILE).stat().st_size > 1000
    written = json.loads((tmp_path / "results.json").read_text())
    assert written["metrics"]["detection"]["threshold"] == detection["threshold"]


def test_strip_without_holdout_is_a_user_error(tmp_path):
    proc = run_bdrun(
        "defense=strip",
        "dataset.holdout_fraction=0",
        "debug=smoke",
        "logger=none",
        f"hydra.run.dir={tmp_path / 'run'}",
        cwd=tmp_path,
    )
    assert proc.returncode == 2
    assert "holdout" in proc.stderr and len(proc.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "run").exists()


# 2000 clean test inputs as in the authors' notebook (n_test = 2000); training is unchanged
FM = ("dataset=fashion_mnist", "logger=none", "dataset.max_test=2000")


@pytest.mark.slow
@needs_fashion_mnist
def test_strip_fashion_mnist_badnets(tmp_path):
    results = run(compose_config("attack=badnets", "defense=strip", *FM), tmp_path)
    d = results["metrics"]["detection"]
    print(f"STRIP FMNIST BadNets: {d}")
    assert d["auroc"] >= 0.98
    assert d["frr"] <= 0.02  # calibrated for 1 % on the holdout
    assert d["far"] <= 0.02
    assert results["metrics"]["after"]["asr"] <= 0.02


@pytest.mark.slow
@needs_fashion_mnist
def test_strip_on_a_clean_model_rejects_about_the_preset_share(tmp_path):
    results = run(compose_config("attack=none", "defense=strip", *FM), tmp_path)
    d = results["metrics"]["detection"]
    print(f"STRIP FMNIST clean model: {d}")
    assert 0.002 <= d["frr"] <= 0.025  # preset 1 %
    before, after = results["metrics"]["before"], results["metrics"]["after"]
    assert before["cca"] - after["cca"] <= 0.025
