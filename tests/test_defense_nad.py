"""Neural Attention Distillation: attention maps by hand, the loss hook, a digits run, and (slow)
Fashion-MNIST."""

from __future__ import annotations

import pytest
import torch

from bdrun.config import component
from bdrun.defenses.nad import (
    attention_loss,
    attention_map,
    augment,
)
from bdrun.errors import BdrunError
from bdrun.runner import run

from conftest import compose_config, needs_fashion_mnist, repair_figures, run_fashion_mnist


def test_attention_map_by_hand():
    # one sample, two channels, 1x2 positions: channel mean of a^2 = [(1+9)/2, (4+0)/2] = [5, 2]
    activation = torch.tensor([[[[1.0, -2.0]], [[3.0, 0.0]]]])
    expected = torch.tensor([[5.0, 2.0]]) / (29**0.5 + 1e-6)
    torch.testing.assert_close(attention_map(activation, p=2.0), expected)
    # p = 1: channel mean of |a| = [2, 1]
    torch.testing.assert_close(
        attention_map(activation, p=1.0), torch.tensor([[2.0, 1.0]]) / (5**0.5 + 1e-6)
    )
    # the map ignores scale: sum over channels (the authors') and mean give the same map
    torch.testing.assert_close(attention_map(3 * activation), attention_map(activation))


def test_attention_loss_by_hand():
    student = torch.tensor([[[[1.0, 0.0]]]])  # map [1, 0]
    teacher = torch.tensor([[[[0.0, 2.0]]]])  # map [0, 1]
    assert attention_loss(student, teacher).item() == pytest.approx(1.0, rel=1e-5)  # (1+1)/2
    assert attention_loss(teacher, 5 * teacher).item() == pytest.approx(0.0, abs=1e-10)


def test_augment_crops_flips_and_cuts_out():
    x = torch.arange(16.0).view(1, 1, 4, 4).repeat(64, 1, 1, 1)
    # nothing on: the batch as it was
    torch.testing.assert_close(augment(x, 0, False, 0), x)
    g = torch.Generator().manual_seed(0)
    flipped = augment(x, 0, True, 0, g)
    is_flipped = (flipped == x.flip(-1)).flatten(1).all(1)
    assert ((flipped == x).flatten(1).all(1) | is_flipped).all() and 0 < is_flipped.sum() < 64
    # a crop of the zero-padded image: every output is the input shifted by at most `padding`
    g = torch.Generator().manual_seed(1)
    cropped = augment(x, 1, False, 0, g)
    padded = torch.nn.functional.pad(x[:1], (1, 1, 1, 1))
    shifts = [padded[0, :, i : i + 4, j : j + 4] for i in range(3) for j in range(3)]
    assert all(any(torch.equal(c, s) for s in shifts) for c in cropped)
    assert len({tuple(c.flatten().tolist()) for c in cropped}) > 1
    # cutout 3 zeroes rows / columns [centre - 1, centre + 1): a 2x2 hole, clipped at the border
    g = torch.Generator().manual_seed(2)
    holes = augment(x + 1, 0, False, 3, g) == 0
    assert holes.flatten(1).sum(1).le(4).all() and holes.flatten(1).sum(1).ge(1).all()


@pytest.mark.parametrize(
    "kwargs",
    [
        {"crop_padding": -1},
        {"cutout": -1},
        {"betas": [-1.0]},
        {"betas": []},
        {"layers": ["relu1", "relu2"], "betas": [5000.0]},
        {"p": 0},
        {"lr": 0},
        {"teacher_epochs": -1},
        {"late_lr": 0},
        {"batch_size": 0},
    ],
)
def test_bad_settings_are_user_errors(kwargs):
    with pytest.raises(BdrunError):
        component("defense", "nad", **kwargs)


def test_nad_on_digits(tmp_path):
    cfg = compose_config("defense=nad", "logger=none")
    results = run(cfg, tmp_path)
    d = results["metrics"]["detection"]
    assert {"teacher_cca", "teacher_asr", "teacher_ra"} <= set(d)
    assert d["nad_layers"] == ["relu2"]  # small_cnn's last conv stage
    assert all(0 <= d[k] <= 1 for k in ("teacher_cca", "teacher_asr"))
    # a second run trains nothing: teacher and student come from the cache
    again = run(cfg, tmp_path / "again")
    assert again["metrics"]["after"] == results["metrics"]["after"]


def test_a_wrong_layer_is_a_user_error(tmp_path):
    cfg = compose_config("defense=nad", "logger=none", "debug=smoke", "defense.layers=[nope]")
    with pytest.raises(BdrunError, match="nope"):
        run(cfg, tmp_path)


@pytest.mark.slow
@needs_fashion_mnist
def test_nad_fashion_mnist_badnets(tmp_path):
    # with tuning/defense_dataset/nad_fashion_mnist.yaml; measured 2026-12-02 (this test's
    # threads): ASR 4.7 %, CCA 87.3 % (92.1 % before): 0.2 points inside the CCA bar. Seed 1
    # misses it (ASR 11.1 %, CCA 87.0 % of 92.4 %, one thread); seed 2 meets it (5.0 %, 87.1 %).
    # (docs/tuning/nad_fashion_mnist.md)
    results = run_fashion_mnist(tmp_path, "attack=badnets", "defense=nad")
    d, before, after = repair_figures(results)
    print(f"NAD FMNIST BadNets: {d}; before {before}; after {after}")
    assert after["asr"] <= 0.10
    assert before["cca"] - after["cca"] <= 0.05
