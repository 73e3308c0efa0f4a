"""SentiNet: Grad-CAM and masks by hand, the boundary fit, calibration, the paste test on a
hand-built model, an end-to-end digits run, and (slow) Fashion-MNIST."""

from __future__ import annotations

import json
import math

import pytest
import torch
from torch import nn

from bdrun.config import component
from bdrun.defenses.sentinet import (
    SCATTER_FILE,
    SentinetDetector,
    boundary_value,
    distance_above,
    fit_boundary,
    grad_cam,
    salient_masks,
)
from bdrun.errors import BdrunError
from bdrun.runner import run

from conftest import compose_config, needs_fashion_mnist


class TwoChannelCam(nn.Module):
    """conv: 1x1, channels (x, 2x); head: global average pool, then class weights `head`."""

    def __init__(self, head: list[list[float]]) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 2, 1, bias=False)
        self.conv.weight.data = torch.tensor([1.0, 2.0]).view(2, 1, 1, 1)
        self.head = torch.tensor(head)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x).mean((2, 3)) @ self.head.T


def test_grad_cam_by_hand():
    # class 0: weights (1, 1) -> alpha = (1, 1) / 16, cam = relu(3x / 16); class 1: (-1, 0)
    model = TwoChannelCam([[1.0, 1.0], [-1.0, 0.0]]).eval()
    x = torch.zeros(2, 1, 4, 4)
    x[0, 0, 1, 2], x[0, 0, 3, 3] = 1.0, 0.5
    x[1, 0, 0, 0] = 0.25
    cams = grad_cam(model, "conv", x, torch.tensor([[0, 1], [0, 1]]))
    assert cams.shape == (2, 2, 4, 4)
    expected = x[:, 0] / x.flatten(1).amax(1)[:, None, None]  # scaled by each map's maximum
    assert torch.allclose(cams[:, 0], expected, atol=1e-6)
    assert torch.all(cams[:, 1] == 0)  # a class the region argues against has no map


def test_grad_cam_upsamples_a_coarse_layer():
    model = nn.Sequential(nn.Conv2d(1, 2, 3, padding=1), nn.MaxPool2d(2), nn.Flatten())
    model.append(nn.Linear(2 * 4 * 4, 3))
    cams = grad_cam(model.eval(), "0", torch.rand(5, 1, 8, 8), torch.zeros(5, 1, dtype=torch.long))
    assert cams.shape == (5, 1, 8, 8) and float(cams.max()) <= 1.0


def test_salient_masks_subtract_the_secondary_classes():
    cams = torch.tensor([[[[1.0, 0.9], [0.5, 0.0]], [[0.5, 0.0], [0.0, 0.0]]]])  # [1, 2, 2, 2]
    alone = salient_masks(cams[:, :1], 0.85)
    assert alone.tolist() == [[[True, True], [False, False]]]
    # heat = (0.5, 0.9, 0.5, 0): only 0.9 reaches 0.85 of the maximum
    assert salient_masks(cams, 0.85).tolist() == [[[False, True], [False, False]]]
    assert not salient_masks(torch.zeros(1, 2, 2, 2), 0.5).any()  # nothing salient: empty


def test_boundary_goes_through_the_most_fooled_point_of_each_bin():
    confidence = torch.tensor([0.01, 0.02, 0.50, 0.51, 0.90])
    fooled = torch.tensor([0.10, 0.30, 0.20, 0.00, 0.50])
    coefficients = fit_boundary(confidence, fooled, 0.04)
    # the bins' maxima (0.02, 0.3), (0.5, 0.2), (0.9, 0.5): a parabola through all three
    fitted = boundary_value(coefficients, torch.tensor([0.02, 0.5, 0.9]))
    assert torch.allclose(fitted, torch.tensor([0.3, 0.2, 0.5], dtype=torch.float64), atol=1e-9)
    line = fit_boundary(torch.tensor([0.1, 0.9]), torch.tensor([0.2, 0.6]), 0.04)
    assert line[0] == 0 and torch.allclose(line[1:], torch.tensor([0.5, 0.15], dtype=torch.float64))


def test_distance_is_signed_and_euclidean():
    flat = torch.tensor([0.0, 0.0, 0.5], dtype=torch.float64)  # fooled = 0.5 everywhere
    d = distance_above(flat, torch.tensor([0.3, 0.3, 0.6]), torch.tensor([0.8, 0.2, 0.5]))
    assert torch.allclose(d, torch.tensor([0.3, -0.3, 0.0], dtype=torch.float64), atol=1e-6)
    diagonal = torch.tensor([0.0, 1.0, 0.0], dtype=torch.float64)  # fooled = confidence
    d = distance_above(diagonal, torch.tensor([0.2]), torch.tensor([0.6]))
    assert math.isclose(float(d), 0.4 / math.sqrt(2), abs_tol=1e-3)  # not the vertical 0.4


class TriggerAtCorner(nn.Module):
    """Class 1 when pixel (0, 0) is bright, else class 0 (whose logit is constant)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 1, 1, bias=False)
        self.conv.weight.data.fill_(1.0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        corner = self.conv(x)[:, 0, 0, 0:1]
        return torch.cat([torch.zeros_like(corner), 20 * corner - 10], 1)


def corner_detector(placement: str = "region") -> SentinetDetector:
    pool = torch.zeros(6, 1, 4, 4)  # clean images: all predicted 0
    noise = torch.full((6, 1, 4, 4), 0.25)
    return SentinetDetector(TriggerAtCorner(), "conv", pool, noise, 1, 0.85, placement, 2, 3, "cpu")


def test_a_pasted_trigger_fools_every_clean_image():
    trojaned = torch.zeros(1, 1, 4, 4)
    trojaned[0, 0, 0, 0] = 1.0
    clean = torch.zeros(1, 1, 4, 4)
    clean[0, 0, 2, 2] = 1.0  # class 0, whose constant logit has no Grad-CAM: empty region
    x = torch.cat([trojaned, clean])
    confidence, fooled, area = corner_detector().confidence_fooled_area(x)
    assert fooled.tolist() == [1.0, 0.0]
    assert area.tolist() == [1 / 16, 0.0]
    # noise 0.25 in the corner: logits (0, -5) -> confidence sigmoid(5); untouched clean: (0, -10)
    assert torch.allclose(confidence, torch.sigmoid(torch.tensor([5.0, 10.0])).double(), atol=1e-6)
    # the trigger on a noise background stays a trigger: logits (0, 10)
    background, _, _ = corner_detector("background").confidence_fooled_area(trojaned)
    assert math.isclose(float(background), float(torch.sigmoid(torch.tensor(10.0))), abs_tol=1e-6)


def test_scores_do_not_depend_on_batching():
    x = torch.rand(7, 1, 4, 4)
    one = corner_detector().confidence_fooled_area(x)
    d = corner_detector()
    d.inputs_per_pass, d.batch_size = 100, 100
    many = d.confidence_fooled_area(x)
    for a, b in zip(one, many, strict=True):
        assert torch.allclose(a, b, atol=1e-6)


def test_calibration_rejects_the_preset_share():
    g = torch.Generator().manual_seed(0)
    confidence, fooled = torch.rand(2000, generator=g), 0.3 * torch.rand(2000, generator=g)
    d = corner_detector()
    distances = d.calibrate(confidence, fooled, 0.04, 0.05)
    assert math.isclose(float((distances > d.threshold).double().mean()), 0.05, abs_tol=0.001)
    above = boundary_value(d.coefficients, confidence) >= fooled.double() - 1e-9
    assert float(above.double().mean()) > 0.8  # the boundary sits on top of the clean cloud


@pytest.mark.parametrize(
    "kwargs",
    [
        {"frr": 0.0},
        {"n_pastes": 0},
        {"paste_share": 1.0},
        {"mask_threshold": 0.0},
        {"secondary_classes": -1},
        {"inert_placement": "everywhere"},
        {"bin_width": 0.0},
        {"max_calibration": 0},
    ],
)
def test_bad_settings_are_user_errors(kwargs):
    with pytest.raises(BdrunError):
        component("defense", "sentinet", **kwargs)


def test_sentinet_on_digits(tmp_path):
    results = run(compose_config("defense=sentinet", "logger=none"), tmp_path)
    detection = results["metrics"]["detection"]
    for key in ("auroc", "frr", "far", "tpr_at_fpr_1", "tpr_at_fpr_5", "threshold"):
        assert key in detection
    assert detection["layer"] == "pool2"  # the small CNN's last conv stage
    assert detection["auroc"] >= 0.95  # measured 0.979
    assert 0 <= detection["frr"] <= 0.1
    before, after = results["metrics"]["before"], results["metrics"]["after"]
    assert after["asr"] <= detection["far"] + 1e-9
    assert after["cca"] >= before["cca"] - detection["frr"] - 1e-9
    assert (tmp_path / SCATTER_FILE).stat().st_size > 1000
    written = json.loads((tmp_path / "results.json").read_text())
    assert written["metrics"]["detection"]["threshold"] == detection["threshold"]


# 1000 clean (+ 900 trojaned) test inputs: each costs a Grad-CAM and 200 predictions
FM = ("dataset=fashion_mnist", "logger=none", "dataset.max_test=1000")


@pytest.mark.slow
@needs_fashion_mnist
def test_sentinet_fashion_mnist_badnets(tmp_path):
    results = run(compose_config("attack=badnets", "defense=sentinet", *FM), tmp_path)
    d = results["metrics"]["detection"]
    print(f"SentiNet FMNIST BadNets: {d}")
    assert d["auroc"] >= 0.95
