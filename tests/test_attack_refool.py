"""Refool: the three reflection models against their formulas, per-image draws that keep the
trigger pure, offline and user reflection images, bad settings (no training)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from bdrun.attacks.images import folder_images, offline_images
from bdrun.attacks.refool import (
    GAMMA,
    Refool,
    focused,
    gaussian_blur,
    ghost,
    out_of_focus,
    vignette,
)
from bdrun.data.base import DataInfo
from bdrun.errors import BdrunError

from conftest import poison_only

FAKE = ("dataset=fake", "dataset.source.shape=[3,16,16]", "dataset.source.n_train=600")
COLOUR = DataInfo("fake", (3, 16, 16), 10)


def refool(info: DataInfo = COLOUR, **changes) -> Refool:
    settings = dict(
        poison_rate=0.04,
        reflections=8,
        image_source="sample_images",
        images=None,
        focused_rate=0.0,
        ghost_rate=0.49,
        alpha_t=None,
        target=0,
    )
    settings.update(changes)
    attack = Refool(**settings)
    attack.setup(info, 0)
    return attack


def test_focused_model_weights_image_and_reflection_by_their_mean_intensity():
    t, r = torch.full((1, 1, 4, 4), 0.2), torch.full((1, 1, 4, 4), 0.6)
    # weights 0.2 / 0.8 = 0.25 and 0.6 / 0.8 = 0.75 (strategy.py blend_image)
    assert torch.allclose(focused(t, r), torch.full_like(t, 0.25 * 0.2 + 0.75 * 0.6))


def test_out_of_focus_model_keeps_alpha_t_of_the_image_in_linear_light():
    t = torch.rand(2, 3, 9, 9) * 0.8
    alpha_t = torch.tensor([0.6, 0.9])
    no_reflection = out_of_focus(
        t, torch.zeros_like(t), alpha_t, torch.tensor([1.0, 2.0]), torch.ones(2)
    )
    expected = (alpha_t.view(-1, 1, 1, 1) * t.pow(GAMMA)).pow(1 / GAMMA)
    assert torch.allclose(no_reflection, expected, atol=1e-5)
    # a flat reflection stays flat under the blur, then the vignette (peak 1 mid-image) scales it
    flat = out_of_focus(
        torch.zeros(1, 1, 9, 9),
        torch.full((1, 1, 9, 9), 0.5),
        alpha_t[:1],
        torch.ones(1),
        torch.ones(1),
    )
    mask = vignette(9, 9) * (1 - 0.6 / 2)
    assert torch.allclose(flat[0, 0], (0.5**GAMMA * mask).pow(1 / GAMMA), atol=1e-5)
    assert flat[0, 0, 4, 4] > flat[0, 0, 0, 0]  # brightest in the middle


def test_gaussian_blur_spreads_an_impulse_by_each_images_sigma():
    x = torch.zeros(2, 1, 15, 15)
    x[:, :, 7, 7] = 1
    out = gaussian_blur(x, torch.tensor([1.0, 2.0]))
    assert torch.allclose(out.sum((1, 2, 3)), torch.ones(2), atol=1e-5)
    for i, sigma in enumerate((1.0, 2.0)):
        half = math.ceil(2 * sigma)
        taps = torch.arange(-half, half + 1, dtype=torch.float32)
        k = torch.exp(-(taps**2) / (2 * sigma**2))
        k = k / k.sum()
        assert torch.allclose(out[i, 0, 7, 7 - half : 8 + half], k[half] * k, atol=1e-6)
        assert out[i, 0, 7, 7 + half + 1 :].abs().max() < 1e-7 if half + 8 < 15 else True
    assert out[1, 0, 7, 7] < out[0, 0, 7, 7]  # wider sigma, lower peak


def test_ghost_model_doubles_an_edge_with_the_ghost_weights():
    r = torch.zeros(1, 1, 16, 16)
    r[..., :8] = 1.0  # left half bright
    out = ghost(
        torch.zeros_like(r), r, torch.tensor([0.5]), torch.tensor([[2, 4]]), torch.tensor([0.3])
    )
    row = out[0, 0, 8].pow(GAMMA) / 0.5  # undo gamma and (1 - alpha_t)
    # left: both copies bright (1); right: neither (0); between: only one copy
    assert row[0] == pytest.approx(1.0, abs=1e-4) and row[-1] == pytest.approx(0.0, abs=1e-4)
    between = row[(row > 0.05) & (row < 0.95)]
    assert len(between) >= 2
    assert any(abs(v - 0.3) < 0.05 or abs(v - 0.7) < 0.05 for v in between.tolist())


def test_the_three_models_give_three_different_images():
    t = torch.rand(1, 3, 16, 16) * 0.5
    r = torch.rand(1, 3, 16, 16)
    one = torch.ones(1)
    a = focused(t, r)
    b = out_of_focus(t, r, 0.7 * one, 2 * one, 1.1 * one)
    c = ghost(t, r, 0.7 * one, torch.tensor([[3, 3]]), 0.3 * one)
    assert (a - b).abs().max() > 0.05 and (b - c).abs().max() > 0.05 and (a - c).abs().max() > 0.05


def test_draws_depend_on_the_image_only_and_cover_the_model_shares():
    attack = refool(focused_rate=0.2, ghost_rate=0.5)
    x = torch.rand(400, 3, 16, 16)
    out = attack.apply_trigger(x)
    # per image, whatever the batch (up to float rounding of the batched convolutions)
    assert torch.allclose(attack.apply_trigger(x[7:9]), out[7:9], atol=1e-5)
    kinds = attack.draws(x)["kind"].bincount(minlength=3).float() / 400
    # focused 20 %, ghost 50 % of the rest (40 %), out of focus 40 %
    assert torch.allclose(kinds, torch.tensor([0.2, 0.4, 0.4]), atol=0.08)
    assert attack.draws(x)["index"].unique().numel() == 8  # every reflection is used
    fixed = refool(alpha_t=0.4).draws(x)["alpha_t"]
    assert torch.all(fixed == 0.4)
    drawn = attack.draws(x)["alpha_t"]
    assert float(drawn.min()) >= 0.55 and float(drawn.max()) <= 0.95


def test_refool_poisons_only_target_images_and_keeps_labels(tmp_path):
    p = poison_only(tmp_path, *FAKE, "attack=refool", "attack.reflections=10")
    mask = p.poisoned.poison
    assert int(mask.sum()) == round(0.04 * len(p.clean_train))
    assert torch.all(p.clean_train.y[mask] == 0) and torch.equal(p.poisoned.y, p.clean_train.y)
    assert p.attack.bank.shape == (10, 3, 16, 16)


def test_sample_image_crops_are_seeded_and_fit_the_data():
    g1, g2 = torch.Generator().manual_seed(1), torch.Generator().manual_seed(1)
    grey = DataInfo("fashion_mnist", (1, 28, 28), 10)
    a, labels = offline_images("sample_images", None, grey, 12, g1)
    b, _ = offline_images("sample_images", None, grey, 12, g2)
    assert a.shape == (12, 1, 28, 28) and torch.equal(a, b)
    assert a.min() >= 0 and a.max() <= 1 and a.std() > 0.01
    assert set(labels.tolist()) <= set(range(8))


def write_png(path, value: int, size=(10, 12)) -> None:
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((*size, 3), value, dtype=np.uint8)).save(path)


def test_a_user_folder_is_read_with_one_label_per_subfolder(tmp_path):
    write_png(tmp_path / "refl" / "a" / "1.png", 200)
    write_png(tmp_path / "refl" / "a" / "2.png", 100)
    write_png(tmp_path / "refl" / "b" / "3.jpg", 50)
    (tmp_path / "refl" / "notes.txt").write_text("not an image")
    images, labels = folder_images(tmp_path / "refl", (1, 8, 8), "images")
    assert images.shape == (3, 1, 8, 8) and labels.tolist() == [0, 0, 1]
    assert images[0].mean() == pytest.approx(200 / 255, abs=1e-3)
    attack = refool(images=str(tmp_path / "refl"), reflections=2)
    assert attack.bank.shape == (2, 3, 16, 16)


@pytest.mark.parametrize(
    "override, message",
    [
        ("attack.images=/no/such/folder", r"attack.images=/no/such/folder: no such folder"),
        ("attack.ghost_rate=1.5", "attack.ghost_rate=1.5 must be a fraction"),
        ("attack.focused_rate=-0.1", "attack.focused_rate=-0.1 must be a fraction"),
        ("attack.alpha_t=1", r"attack.alpha_t=1.0 must be in \(0, 1\)"),
        ("attack.reflections=0", "attack.reflections=0 must be >= 1"),
        ("attack.reflections=abc", "attack.reflections='abc' must be an integer"),
        ("attack.image_source=imagenet", "attack.image_source='imagenet' must be one of"),
        ("attack.poison_rate=0.5", "needs .* target-class training samples"),
    ],
)
def test_bad_refool_settings_end_in_one_line(override, message, tmp_path):
    with pytest.raises(BdrunError, match=message) as err:
        poison_only(tmp_path, *FAKE, "attack=refool", override)
    assert "\n" not in str(err.value)


def test_an_empty_folder_is_a_one_line_error(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(BdrunError, match="holds no png/jpg/jpeg/bmp files"):
        poison_only(tmp_path, *FAKE, "attack=refool", f"attack.images={tmp_path / 'empty'}")
