"""NIC: layer features by hand, invariants on synthetic data, calibration, an end-to-end digits
run, and (slow) Fashion-MNIST."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from torch import nn

from bdrun.config import component
from bdrun.defenses.nic import HISTOGRAM_FILE, NicDetector, default_layers, pooled_outputs
from bdrun.errors import BdrunError
from bdrun.metrics import auroc
from bdrun.models.small_cnn import SmallCNN
from bdrun.runner import run

from conftest import compose_config, needs_fashion_mnist


def test_default_layers_are_the_conv_and_linear_layers_in_order():
    assert default_layers(SmallCNN((1, 8, 8), 10)) == ["conv1", "conv2", "fc1", "classifier"]


class PoolThenLinear(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 2, 1, bias=False)
        self.conv.weight.data = torch.tensor([1.0, 2.0]).view(2, 1, 1, 1)
        self.fc = nn.Linear(2, 1, bias=False)
        self.fc.weight.data = torch.tensor([[1.0, -1.0]])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.conv(x).mean((2, 3)))


def test_pooled_outputs_by_hand():
    x = torch.zeros(3, 1, 2, 2)
    x[0, 0, 0, 0] = 1.0  # mean 0.25
    x[1] = 0.5
    conv, fc = pooled_outputs(PoolThenLinear(), ["conv", "fc"], x, batch_size=2)
    assert torch.allclose(conv, torch.tensor([[0.25, 0.5], [0.5, 1.0], [0.0, 0.0]]).double())
    assert torch.allclose(fc, torch.tensor([[-0.25], [-0.5], [0.0]]).double())


def mlp() -> nn.Module:
    """Identity hidden layers; the class is the brightest of pixel 0, pixel 1, pixels 2 + 3."""
    model = nn.Sequential(
        nn.Flatten(), nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 3)
    )
    with torch.no_grad():
        for layer in (model[1], model[3]):
            layer.weight.copy_(torch.eye(4))
            layer.bias.zero_()
        model[5].weight.copy_(torch.tensor([[2.0, 0, 0, 0], [0, 2.0, 0, 0], [0, 0, 1.0, 1.0]]))
        model[5].bias.zero_()
    return model.eval()


def nic_detector(model: nn.Module, one_class: str = "ocsvm") -> NicDetector:
    return NicDetector(
        model, ["1", "3", "5"], one_class, 0.1, 0.01, 0.1, "scale", 256, 64, "cpu", 0
    )


# an isolation forest's score saturates beyond the clean range (measured AUROC 0.69 here)
@pytest.mark.parametrize(("one_class", "bar"), [("ocsvm", 0.95), ("isolation_forest", 0.6)])
def test_inputs_off_the_clean_distribution_score_higher(one_class, bar):
    g = torch.Generator().manual_seed(0)
    clean = lambda n: torch.rand(n, 1, 2, 2, generator=g)  # noqa: E731
    model = mlp()
    d = nic_detector(model, one_class)
    d.fit_invariants(clean(400))
    d.fit_final(clean(200))
    inliers = d.score(clean(200))
    outliers = clean(200)
    outliers[:, 0, 0, 0] += 3.0  # a "trigger" pixel the clean data never has
    assert auroc(inliers, d.score(outliers)) > bar
    assert len(d.value_models) == 3 and len(d.provenance_models) == 2  # 3 layers, 2 pairs
    assert d.score(torch.empty(0, 1, 2, 2)).shape == (0,)


def test_calibration_rejects_the_preset_share():
    d = nic_detector(mlp())
    scores = torch.linspace(0.0, 1.0, 1001, dtype=torch.float64)
    threshold = d.calibrate(scores, 0.05)
    assert math.isclose(threshold, 0.95, abs_tol=1e-9)
    assert math.isclose(float((scores > d.threshold).double().mean()), 0.05, abs_tol=0.002)


def test_a_model_with_one_predicted_class_gets_constant_provenance():
    """A model that labels every holdout image alike (a smoke-sized model) leaves the linear
    classifiers nothing to learn: each layer's probability vector is the constant [1], and the
    value invariants still score inputs."""

    class Constant(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(4, 2)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.fc(x.flatten(1)) * 0 + torch.tensor([1.0, 0.0])

    d = NicDetector(Constant(), ["fc", "fc"], "ocsvm", 0.1, 0.01, 0.1, "scale", 256, 64, "cpu", 0)
    x = torch.rand(20, 1, 2, 2)
    d.fit_invariants(x)
    assert all(view.classifier is None for view in d.views)
    assert np.array_equal(d.views[0].probabilities(torch.rand(3, 2)), np.ones((3, 1)))


@pytest.mark.parametrize(
    "kwargs",
    [
        {"frr": 1.0},
        {"one_class": "lof"},
        {"value_nu": 0.0},
        {"provenance_nu": 1.5},
        {"final_nu": -0.1},
        {"gamma": "auto"},
        {"gamma": 0},
        {"pca_components": -1},
        {"invariant_share": 0.8, "final_share": 0.2},
        {"final_share": 0.0},
    ],
)
def test_bad_settings_are_user_errors(kwargs):
    with pytest.raises(BdrunError):
        component("defense", "nic", **kwargs)


def test_nic_on_digits_rejects_trojaned_inputs(tmp_path):
    results = run(compose_config("defense=nic", "logger=none"), tmp_path)
    detection = results["metrics"]["detection"]
    for key in ("auroc", "frr", "far", "tpr_at_fpr_1", "tpr_at_fpr_5", "threshold"):
        assert key in detection
    assert detection["auroc"] >= 0.95  # measured 0.991
    assert detection["layers"] == ["conv1", "conv2", "fc1", "classifier"]
    assert set(detection["provenance_auroc"]) == {"conv1>conv2", "conv2>fc1", "fc1>classifier"}
    before, after = results["metrics"]["before"], results["metrics"]["after"]
    assert after["asr"] <= detection["far"] + 1e-9 < before["asr"]
    assert after["cca"] >= before["cca"] - detection["frr"] - 1e-9
    assert (tmp_path / HISTOGRAM_FILE).stat().st_size > 1000
    written = json.loads((tmp_path / "results.json").read_text())
    assert written["metrics"]["detection"]["threshold"] == detection["threshold"]


def test_a_wrong_layer_name_is_a_user_error(tmp_path):
    with pytest.raises(BdrunError, match="no layer"):
        run(compose_config("defense=nic", "defense.layers=[conv9]", "logger=none"), tmp_path)


FM = ("dataset=fashion_mnist", "logger=none", "dataset.max_test=2000")


@pytest.mark.slow
@needs_fashion_mnist
def test_nic_fashion_mnist_badnets(tmp_path):
    results = run(compose_config("attack=badnets", "defense=nic", *FM), tmp_path)
    d = results["metrics"]["detection"]
    print(f"NIC FMNIST BadNets: {d}")
    assert d["auroc"] >= 0.95
