"""SCALE-UP: SPC by hand, calibration and rejection, normalisation, and bad values."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from bdrun.config import component
from bdrun.defenses.base import calibrate_on_holdout
from bdrun.defenses.scale_up import ScaleUpDetector
from bdrun.errors import BdrunError
from bdrun.runner import run

from conftest import compose_config


class CornerOrMean(nn.Module):
    """Label 2 when the top-left pixel is lit (a scale-invariant 'trigger'); otherwise label 1
    for a dark image (mean pixel below 0.25) and 0 for a bright one, so that scaling a dark clean
    image up changes its label."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        corner = (x[:, 0, 0, 0] > 0.5).float()
        bright = (x.flatten(1).mean(1) > 0.25).float()
        return torch.stack([bright * (1 - corner), (1 - bright) * (1 - corner), 2 * corner], 1)


def detector(normalization: str = "none") -> ScaleUpDetector:
    return ScaleUpDetector(CornerOrMean(), [3, 5, 7, 9, 11], normalization, 4, "cpu")


def test_a_scale_invariant_prediction_has_spc_one_and_is_rejected():
    clean = torch.full((20, 1, 4, 4), 0.1)
    clean[:, 0, 0, 0] = 0.0
    trojaned = clean[:3].clone()
    trojaned[:, 0, 0, 0] = 1.0
    d = detector()
    spc, labels = d.spc(clean)
    assert torch.all(spc == 0) and torch.all(labels == 1)  # 0.1 x 3 is bright already
    d.calibrate(spc, 0.01)
    assert torch.all(d.measure(trojaned).parts["spc"] == 1)
    assert d.rejects(trojaned).all() and not d.rejects(clean).any()


def test_per_class_normalisation_uses_the_statistics_of_the_predicted_label():
    d = detector("per_class")
    spc = torch.tensor([0.2, 0.4, 1.0, 1.0], dtype=torch.float64)
    labels = torch.tensor([0, 0, 2, 2])
    d.fit_normalization(spc, labels, 3)
    assert torch.allclose(d.standardise(spc[:2], labels[:2]), torch.tensor([-1.0, 1.0]).double())
    assert d.mean[1] == float(spc.mean())  # a label the holdout never got: the global pair


class Figures:
    """The one RunContext tool the calibration uses: `record`."""

    def __init__(self) -> None:
        self.figures: dict = {}

    def record(self, **figures) -> None:
        self.figures.update(figures)


def test_a_tie_at_the_top_score_that_rejects_nothing_is_reported():
    spc = torch.tensor([0.0] * 90 + [1.0] * 10, dtype=torch.float64)
    figures = Figures()
    threshold = calibrate_on_holdout(detector(), spc, 0.01, figures, "SCALE-UP")
    assert threshold == 1.0
    (warning,) = figures.figures["warnings"]
    assert "10.0 % of the clean holdout tie at the top score 1" in warning
    assert "defense.frr above 0.100" in warning
    spread = torch.linspace(0, 1, 100, dtype=torch.float64)
    quiet = Figures()
    calibrate_on_holdout(detector(), spread, 0.01, quiet, "SCALE-UP")
    assert "warnings" not in quiet.figures


def test_with_frr_null_the_authors_fixed_threshold_decides(tmp_path):
    results = run(
        compose_config("model=small_cnn_bn", "defense=scale_up", "defense.frr=null", "logger=none"),
        tmp_path,
    )
    detection = results["metrics"]["detection"]
    assert detection["threshold"] == 0.5
    assert "warnings" not in detection
    # SPC > 0.5 is rejected: the trojaned inputs keep their label under scaling
    assert detection["far"] < 0.5


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"scales": []}, "defense.scales=.* must be a non-empty list"),
        ({"scales": [3, -1]}, "defense.scales=.* must be a non-empty list"),
        ({"frr": 1.5}, r"defense.frr=1.5 must be in \(0, 1\)"),
        ({"threshold": "x"}, "defense.threshold"),
        ({"frr": 0}, r"defense.frr=0.0 must be in \(0, 1\)"),
        ({"normalization": "z"}, "defense.normalization='z' must be one of"),
    ],
)
def test_bad_values_end_in_one_line(overrides, message):
    with pytest.raises(BdrunError, match=message) as err:
        component("defense", "scale_up", **overrides)
    assert "\n" not in str(err.value)
