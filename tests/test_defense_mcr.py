"""Mode connectivity repair: the Bezier curve by hand, BatchNorm recomputation, a digits run, and
(slow) Fashion-MNIST."""

from __future__ import annotations

import csv

import pytest
import torch
from torch import nn

from bdrun.config import component
from bdrun.defenses.mcr import BezierCurve, bezier, update_bn
from bdrun.errors import BdrunError
from bdrun.runner import run

from conftest import compose_config, needs_fashion_mnist, repair_figures, run_fashion_mnist


def two_models():
    torch.manual_seed(0)
    start = nn.Sequential(nn.Conv2d(1, 2, 3), nn.BatchNorm2d(2), nn.Flatten(), nn.Linear(8, 3))
    end = nn.Sequential(nn.Conv2d(1, 2, 3), nn.BatchNorm2d(2), nn.Flatten(), nn.Linear(8, 3))
    return start, end


def test_bezier_formula():
    start, control, end = torch.tensor(1.0), torch.tensor(5.0), torch.tensor(3.0)
    assert bezier(start, control, end, 0.0) == 1.0
    assert bezier(start, control, end, 1.0) == 3.0
    # 0.25 * 1 + 2 * 0.25 * 5 + 0.25 * 3
    assert bezier(start, control, end, 0.5) == pytest.approx(3.5)


def test_curve_ends_are_the_end_models_and_the_middle_follows_the_formula():
    start, end = two_models()
    curve = BezierCurve(start, end)
    with torch.no_grad():
        for param in curve.control.values():
            param.add_(1.0)  # move the control point off the straight line
    at_start, at_end, middle = curve.model_at(0.0), curve.model_at(1.0), curve.model_at(0.5)
    for (name, value), (_, first), (_, last), (_, mid) in zip(
        start.named_parameters(),
        at_start.named_parameters(),
        at_end.named_parameters(),
        middle.named_parameters(),
        strict=True,
    ):
        torch.testing.assert_close(first, value)
        torch.testing.assert_close(last, dict(end.named_parameters())[name])
        control = (value + dict(end.named_parameters())[name]) / 2 + 1
        expected = 0.25 * value + 0.5 * control + 0.25 * dict(end.named_parameters())[name]
        torch.testing.assert_close(mid, expected)
    # only the control point trains
    trainable = [name for name, p in curve.named_parameters() if p.requires_grad]
    assert trainable and all(name.startswith("control.") for name in trainable)


def test_control_point_starts_at_the_midpoint_or_at_the_given_model():
    start, end = two_models()
    torch.manual_seed(1)
    control = nn.Sequential(nn.Conv2d(1, 2, 3), nn.BatchNorm2d(2), nn.Flatten(), nn.Linear(8, 3))
    linear, random = BezierCurve(start, end), BezierCurve(start, end, control)
    for name, first in start.named_parameters():
        last, own = dict(end.named_parameters())[name], dict(control.named_parameters())[name]
        key = name.replace(".", "__")
        torch.testing.assert_close(linear.control[key].detach(), (first + last) / 2)
        torch.testing.assert_close(random.control[key].detach(), own.detach())
        assert random.control[key].data_ptr() != own.data_ptr()  # a copy, not the model's
    # the ends stay the end models whatever the control point
    torch.testing.assert_close(random.model_at(1.0)[3].weight, end[3].weight)


def test_point_decay_is_the_gradient_of_half_decay_times_the_squared_norm_of_w_t():
    start, end = two_models()
    curve = BezierCurve(start, end, point_decay=0.1).train()
    x = torch.rand(2, 1, 4, 4)
    torch.manual_seed(3)
    t = torch.rand(())  # the t the training forward pass draws next
    torch.manual_seed(3)
    (curve(x) * 0).sum().backward()  # no data term: the decay alone
    for name, point in curve.weights(t).items():
        grad = curve.control[name.replace(".", "__")].grad
        # d/dtheta 0.5 * 0.1 * ||w(t)||^2 = 2 t (1 - t) * 0.1 * w(t)
        torch.testing.assert_close(grad, 2 * t * (1 - t) * 0.1 * point.detach())


def test_curve_forward_in_eval_mode_is_the_model_at_t():
    start, end = two_models()
    curve = BezierCurve(start, end).eval()
    curve.t = 0.3
    x = torch.rand(4, 1, 4, 4)
    torch.testing.assert_close(curve(x), curve.model_at(0.3)(x))


def test_update_bn_recomputes_the_statistics():
    start, _ = two_models()
    x = torch.rand(32, 1, 4, 4) * 3 + 1
    model = update_bn(start, x, batch_size=8)
    bn = model[1]
    features = model[0](x)
    torch.testing.assert_close(bn.running_mean, features.mean((0, 2, 3)), rtol=1e-4, atol=1e-5)
    assert bn.momentum == 0.1 and not model.training  # put back as it was
    plain = nn.Sequential(nn.Flatten(), nn.Linear(16, 2))
    assert update_bn(plain, x, 8) is plain


@pytest.mark.parametrize(
    "kwargs",
    [
        {"t": 1.5},
        {"t": -0.1},
        {"path_points": 1},
        {"lr": 0},
        {"batch_size": 0},
        {"init": "zeros"},
        {"end_model": "clean"},
    ],
)
def test_bad_settings_are_user_errors(kwargs):
    with pytest.raises(BdrunError):
        component("defense", "mcr", **kwargs)


def test_mcr_on_digits(tmp_path):
    cfg = compose_config("defense=mcr", "logger=none", "defense.epochs=20")
    results = run(cfg, tmp_path)
    d = results["metrics"]["detection"]
    assert d["mcr_t"] == 0.3
    assert [row["t"] for row in d["mcr_path"]] == pytest.approx([i / 10 for i in range(11)])
    # t = 0 is the poisoned model itself
    assert d["mcr_path"][0]["asr"] == results["metrics"]["before"]["asr"]
    assert d["mcr_path"][0]["cca"] == results["metrics"]["before"]["cca"]
    with open(tmp_path / "mcr_path.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 11 and set(rows[0]) == {"t", "holdout_acc", "cca", "asr", "ra"}
    assert (tmp_path / "mcr_path.png").stat().st_size > 0


@pytest.mark.slow
@needs_fashion_mnist
def test_mcr_fashion_mnist_badnets(tmp_path):
    # tuning/defense_dataset/mcr_fashion_mnist.yaml: init=random, lr 0.05, wd 0.01, t = 0.35;
    # measured ASR 6.5 % / CCA -4.8 points (seed 0), 4.5 % / -4.7 (seed 1), 5.1 % / -4.2 (seed 2)
    # (docs/tuning/mcr_fashion_mnist.md)
    results = run_fashion_mnist(tmp_path, "attack=badnets", "defense=mcr")
    d, before, after = repair_figures(results)
    print(f"MCR FMNIST BadNets: {d}; before {before}; after {after}")
    assert after["asr"] <= 0.10
    assert before["cca"] - after["cca"] <= 0.05
