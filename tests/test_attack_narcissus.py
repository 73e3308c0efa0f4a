"""Narcissus: the trigger stays in its L-inf ball and lowers the target loss, test-time
magnification, the poison budget's minimum of one, POOD images, bad settings."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from bdrun.attacks.narcissus import optimise_trigger
from bdrun.data.base import to_float
from bdrun.errors import BdrunError
from bdrun.models.small_cnn import SmallCNN

from conftest import poison_only

# a small, cheap run: 1 training epoch, few trigger passes
FAST = (
    "dataset=fake",
    "dataset.source.shape=[1,8,8]",
    "dataset.source.n_train=400",
    "train.epochs=1",
    "attack=narcissus",
    "attack.trigger_steps=5",
    "attack.warmup_epochs=1",
    "attack.image_source=sample_images",
)


def test_the_trigger_stays_within_eps_and_lowers_the_target_loss():
    torch.manual_seed(0)
    model = SmallCNN((1, 8, 8), 10).eval()
    x = torch.rand(40, 1, 8, 8)
    g = torch.Generator().manual_seed(0)
    target = torch.zeros(40, dtype=torch.long)
    before = F.cross_entropy(model(x), target)
    trigger = optimise_trigger(model, x, 0, 16 / 255, 30, 0.01, 16, g)
    after = F.cross_entropy(model((x + trigger).clamp(0, 1)), target)
    assert trigger.shape == (1, 8, 8)
    assert trigger.abs().max() <= 16 / 255 + 1e-7
    assert after < before
    huge = optimise_trigger(model, x, 0, 4 / 255, 10, 10.0, 16, torch.Generator().manual_seed(0))
    assert huge.abs().max() <= 4 / 255 + 1e-7 and huge.abs().max() > 0


def test_poisons_carry_the_trigger_and_test_inputs_three_times_it(tmp_path):
    p = poison_only(tmp_path, *FAST)
    attack = p.attack
    trigger = attack.trigger
    assert trigger.abs().max() <= 16 / 255 + 1e-7 and trigger.abs().max() > 0
    x = torch.full((2, 1, 8, 8), 0.5)
    assert torch.allclose(attack.apply_trigger(x) - x, 3 * trigger.expand(2, -1, -1, -1), atol=1e-6)
    assert torch.allclose(
        attack.poison_images(x, None) - x, trigger.expand(2, -1, -1, -1), atol=1e-6
    )
    mask = p.poisoned.poison
    poisoned, clean = to_float(p.poisoned.x[mask]), to_float(p.clean_train.x[mask])
    assert torch.allclose(poisoned, (clean + trigger).clamp(0, 1), atol=1 / 255)
    assert torch.all(p.clean_train.y[mask] == 0) and torch.equal(p.poisoned.y, p.clean_train.y)


def test_the_poison_budget_rounds_to_at_least_one_sample(tmp_path):
    p = poison_only(tmp_path, *FAST)
    n = len(p.clean_train)
    assert round(0.0005 * n) == 0 and int(p.poisoned.poison.sum()) == 1
    assert p.attack.poison_count(60000) == 30  # 0.05 % of Fashion-MNIST's training set


def test_pood_images_come_from_a_user_folder(tmp_path):
    from PIL import Image

    for k, label in enumerate(("cats", "dogs", "cars")):
        folder = tmp_path / "pood" / label
        folder.mkdir(parents=True)
        Image.fromarray(np.full((12, 12), 40 * (k + 1), dtype=np.uint8)).save(folder / "a.png")
    p = poison_only(tmp_path / "run", *FAST, f"attack.images={tmp_path / 'pood'}")
    assert p.attack.trigger.abs().max() > 0


@pytest.mark.parametrize(
    "override, message",
    [
        ("attack.eps=0", r"attack.eps=0.0 must be in \(0, 255\]"),
        ("attack.test_multiplier=0", "attack.test_multiplier=0.0 must be > 0"),
        ("attack.trigger_steps=0", "attack.trigger_steps=0 must be >= 1"),
        ("attack.warmup_lr=-1", "attack.warmup_lr=-1.0 must be > 0"),
        ("attack.batch_size=1.5", "attack.batch_size=1.5 must be an integer"),
        ("attack.surrogate_epochs=0", "attack.surrogate_epochs=0 must be >= 1 or null"),
        ("attack.pood_ratio=0", "attack.pood_ratio=0.0 must be > 0"),
        ("attack.image_source=tinyimagenet", "attack.image_source='tinyimagenet' must be one of"),
        ("attack.images=/no/such/folder", "attack.images=/no/such/folder: no such folder"),
    ],
)
def test_bad_narcissus_settings_end_in_one_line(override, message, tmp_path):
    with pytest.raises(BdrunError, match=message) as err:
        poison_only(tmp_path, *FAST, override)
    assert "\n" not in str(err.value)
