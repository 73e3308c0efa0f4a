"""Adaptive-Blend and Adaptive-Patch: exact poison and cover counts, cover samples that keep
their labels and carry a partial trigger, the test-time trigger, the runner's accounting of
cover samples, bad settings (no training except one smoke run)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from bdrun.attacks.adaptive import piece_map
from bdrun.data.base import to_float
from bdrun.errors import BdrunError
from bdrun.runner import run

from conftest import compose_config, poison_only

FAKE = (
    "dataset=fake",
    "dataset.source.shape=[3,16,16]",
    "dataset.source.n_train=2000",
    "dataset.holdout_fraction=0.1",
)
N_TRAIN = 1800


def changed(p):
    return (p.poisoned.x != p.clean_train.x).any(1)  # [N, H, W]


@pytest.mark.parametrize(
    "name, poison, cover", [("adaptive_blend", 0.003, 0.003), ("adaptive_patch", 0.003, 0.006)]
)
def test_exact_poison_and_cover_counts_and_labels(name, poison, cover, tmp_path):
    p = poison_only(
        tmp_path, *FAKE, f"attack={name}", "attack.poison_rate=0.01", "attack.cover_rate=0.02"
    )
    assert len(p.clean_train) == N_TRAIN
    mask, cover_mask = p.poisoned.poison, p.attack.cover
    assert int(mask.sum()) == round(0.01 * N_TRAIN) and int(cover_mask.sum()) == round(
        0.02 * N_TRAIN
    )
    assert not (mask & cover_mask).any()
    assert torch.all(p.poisoned.y[mask] == 0) and torch.all(p.clean_train.y[mask] != 0)
    assert torch.equal(p.poisoned.y[cover_mask], p.clean_train.y[cover_mask])
    assert len(p.clean_train.y[cover_mask].unique()) > 1  # cover samples come from any class
    touched = changed(p).flatten(1).any(1)
    assert torch.equal(touched, mask | cover_mask)  # nothing else changes
    defaults = poison_only(tmp_path / "d", *FAKE, f"attack={name}")
    assert int(defaults.poisoned.poison.sum()) == round(poison * N_TRAIN)
    assert int(defaults.attack.cover.sum()) == round(cover * N_TRAIN)


def test_blend_pieces_split_the_image_into_an_even_grid():
    assert torch.equal(piece_map(4, 4, 4), torch.tensor([[0, 0, 1, 1]] * 2 + [[2, 2, 3, 3]] * 2))
    uneven = piece_map(7, 5, 16)  # rows 2,2,2,1 / cols 2,1,1,1 of a 4 x 4 grid
    assert uneven.unique().tolist() == list(range(16))


def test_adaptive_blend_training_images_carry_half_of_the_pieces(tmp_path):
    p = poison_only(
        tmp_path,
        *FAKE,
        "attack=adaptive_blend",
        "attack.poison_rate=0.01",
        "attack.cover_rate=0.01",
    )
    pieces = piece_map(16, 16, 16)
    diff = changed(p)
    kept = []
    for row in (p.poisoned.poison | p.attack.cover).nonzero().flatten().tolist():
        touched = pieces[diff[row]].unique()
        kept.append(tuple(touched.tolist()))
        assert len(touched) <= 8  # round(0.5 x 16) pieces are masked per image
        assert len(touched) >= 6  # (a pixel may round to its old value)
    assert len(set(kept)) > 1  # a fresh choice per image
    # training alpha 0.15 on the kept pieces: x' - x = 0.15 (key - x)
    row = int(p.attack.cover.nonzero()[0])
    x, out = to_float(p.clean_train.x[row]), to_float(p.poisoned.x[row])
    key = p.attack._key
    inside = diff[row]
    assert torch.allclose((out - x)[:, inside], (0.15 * (key - x))[:, inside], atol=1 / 255)


def test_adaptive_blend_test_inputs_get_the_whole_key_at_test_alpha(tmp_path):
    p = poison_only(tmp_path, *FAKE, "attack=adaptive_blend")
    x = torch.rand(4, 3, 16, 16)
    assert torch.allclose(p.attack.apply_trigger(x), 0.8 * x + 0.2 * p.attack._key, atol=1e-6)


def test_adaptive_patch_training_images_carry_one_trigger_each_in_quarters(tmp_path):
    p = poison_only(
        tmp_path,
        *FAKE,
        "attack=adaptive_patch",
        "attack.poison_rate=0.02",
        "attack.cover_rate=0.02",
    )
    masks = p.attack.masks[:, 0].bool()  # [4, H, W]
    diff = changed(p)
    for chosen in (p.poisoned.poison, p.attack.cover):
        rows = chosen.nonzero().flatten()
        which = []
        for row in rows.tolist():
            hits = [k for k in range(4) if diff[row][masks[k]].any()]
            assert len(hits) == 1 and not diff[row][~masks[hits[0]]].any()
            which.append(hits[0])
        n = len(rows)
        assert which == [i * 4 // n for i in range(n)]  # the toolbox's quarters, in index order
    # opacity 0.5 for trigger 0: x' = x + 0.5 (pattern - x) on its pixels
    row = int(p.poisoned.poison.nonzero()[0])
    x, out = to_float(p.clean_train.x[row]), to_float(p.poisoned.x[row])
    pattern = p.attack.patterns[0]
    assert torch.allclose(out[:, masks[0]], (x + 0.5 * (pattern - x))[:, masks[0]], atol=1 / 255)


def test_adaptive_patch_test_inputs_carry_triggers_0_and_2_opaque(tmp_path):
    p = poison_only(tmp_path, *FAKE, "attack=adaptive_patch")
    attack = p.attack
    x = torch.rand(3, 3, 16, 16)
    out = attack.apply_trigger(x)
    masks = attack.masks[:, 0].bool()
    for k in (0, 2):
        assert torch.equal(out[:, :, masks[k]], attack.patterns[k][:, masks[k]].expand(3, -1, -1))
    untouched = ~(masks[0] | masks[2])
    assert torch.equal(out[:, :, untouched], x[:, :, untouched])


def test_adaptive_patch_reads_trigger_files_with_black_as_transparent(tmp_path):
    from PIL import Image

    files = []
    for k in range(2):
        array = np.zeros((16, 16, 3), dtype=np.uint8)
        array[k * 4 : k * 4 + 3, 2:5] = 255
        path = tmp_path / f"t{k}.png"
        Image.fromarray(array).save(path)
        files.append(str(path))
    p = poison_only(
        tmp_path / "run",
        *FAKE,
        "attack=adaptive_patch",
        f"attack.images=[{files[0]},{files[1]}]",
        "attack.alphas=[0.5,0.5]",
        "attack.test_triggers=[1]",
        "attack.test_alphas=[1.0]",
    )
    assert p.attack.masks.shape == (2, 1, 16, 16) and int(p.attack.masks[0].sum()) == 9


def test_a_run_reports_cover_samples_and_what_a_filter_removed_of_them(tmp_path):
    cfg = compose_config(
        "attack=adaptive_blend",
        "defense=spectral",
        "debug=smoke",
        "logger=none",
        "attack.poison_rate=0.05",
        "attack.cover_rate=0.05",
    )
    run(cfg, tmp_path)
    results = json.loads((tmp_path / "results.json").read_text())
    assert results["poison"]["train_poisoned"] == round(0.05 * 256)
    assert results["poison"]["train_cover"] == round(0.05 * 256)
    detection = results["metrics"]["detection"]
    assert 0 <= detection["cover_removed"] <= detection["removed"]


@pytest.mark.parametrize(
    "name, override, message",
    [
        ("adaptive_blend", "attack.pieces=15", "attack.pieces=15 must be a square number"),
        ("adaptive_blend", "attack.pieces=400", "pieces smaller than a pixel"),
        ("adaptive_blend", "attack.mask_rate=1", "attack.mask_rate=1.0 masks all 16 pieces"),
        ("adaptive_blend", "attack.train_alpha=0", "attack.train_alpha=0 blends nothing"),
        ("adaptive_blend", "attack.cover_rate=1.5", "attack.cover_rate=1.5 must be a fraction"),
        ("adaptive_blend", "attack.cover_rate=0.999", r"exceed the training set"),
        ("adaptive_blend", "attack.pattern=kitty", "attack.pattern='kitty' must be one of"),
        (
            "adaptive_patch",
            "attack.test_triggers=[0,5]",
            r"attack.test_triggers=\[0, 5\] must be in 0..3",
        ),
        ("adaptive_patch", "attack.alphas=[0.5]", "attack.alphas has 1 values for 4 triggers"),
        ("adaptive_patch", "attack.size=0", "attack.size=0 must be >= 1"),
        ("adaptive_patch", "attack.size=8", "the four corner patches overlap on 16x16"),
        ("adaptive_patch", "attack.images=[/no/such.png]", "trigger image not found"),
    ],
)
def test_bad_adaptive_settings_end_in_one_line(name, override, message, tmp_path):
    with pytest.raises(BdrunError, match=message) as err:
        poison_only(tmp_path, *FAKE, f"attack={name}", override)
    assert "\n" not in str(err.value)
