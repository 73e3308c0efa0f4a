"""Attack selection and BadNets specifics (the contract over every attack: test_contracts.py)."""

from __future__ import annotations

import pytest
import torch

from bdrun.data.base import to_float
from bdrun.errors import BdrunError

from conftest import attack_overrides, conf_options, poison_only

ATTACKS = conf_options("attack")
FAST = (
    "dataset=fake",
    "train.epochs=1",
    "dataset.source.shape=[3,16,16]",
    "dataset.source.n_train=600",
)


def prepared(tmp_path, *overrides):
    return poison_only(tmp_path, *FAST, *overrides)


# the clean baseline, pretrained (a model poisoned elsewhere) and blind (a poisoned loss
# computation) poison no training sample
@pytest.mark.parametrize("name", [a for a in ATTACKS if a not in ("none", "pretrained", "blind")])
def test_attack_selection_changes_with_the_seed(name, tmp_path):
    extra = attack_overrides(name, tmp_path, *FAST)
    a = prepared(tmp_path, f"attack={name}", "seed=0", *extra).poisoned.poison
    b = prepared(tmp_path, f"attack={name}", "seed=1", *extra).poisoned.poison
    assert not torch.equal(a, b)


def test_badnets_stamps_the_patch_bottom_right(tmp_path):
    p = prepared(tmp_path, "attack=badnets", "attack.margin=1", "attack.size=3")
    x = to_float(p.poisoned.x[p.poisoned.poison])
    assert torch.all(x[:, :, 12:15, 12:15] == 1.0)
    bd = to_float(p.backdoor_test.x)
    assert torch.all(bd[:, :, 12:15, 12:15] == 1.0)
    assert torch.all(p.backdoor_test.y == 0)
    assert not torch.any(p.backdoor_test.orig_y == 0)


def test_badnets_single_pixel_changes_one_pixel(tmp_path):
    p = prepared(tmp_path, "attack=badnets_pixel", "attack.margin=0")
    diff = (p.poisoned.x != p.clean_train.x)[p.poisoned.poison]
    per_image = diff.any(1).flatten(1).sum(1)  # changed pixel positions per image
    assert torch.all(per_image <= 1)
    assert torch.all(to_float(p.poisoned.x[p.poisoned.poison])[:, :, 15, 15] == 1.0)


def test_badnets_all2all_uses_every_class(tmp_path):
    p = prepared(tmp_path, "attack=badnets_all2all")
    # all-to-all: every test input is a backdoor input
    assert len(p.backdoor_test) == len(p.setup.splits.test)
    assert set(p.poisoned.y[p.poisoned.poison].tolist()) == set(range(10))


@pytest.mark.parametrize(
    "override, message",
    [
        ("attack.poison_rate=1.5", "poison_rate=1.5 must be in"),
        ("attack.poison_rate=0", "poison_rate=0.0 must be in"),
        ("attack.target=10", "target=10 is outside the 10 classes"),
        ("attack.target=-1", "target=-1 is outside"),
        ("attack.size=17", "does not fit 16x16"),
        ("attack.label_mode=some2some", "label_mode"),
        ("attack.location=middle", "location"),
    ],
)
def test_bad_attack_parameters_are_user_errors(override, message, tmp_path):
    with pytest.raises(BdrunError, match=message):
        prepared(tmp_path, "attack=badnets", override)


def test_a_rate_larger_than_the_eligible_share_is_refused(tmp_path):
    with pytest.raises(BdrunError, match="only .* exist"):
        prepared(tmp_path, "attack=badnets", "attack.poison_rate=0.99")
