"""Behavioural contracts every attack and every defense must keep, as functions that raise an
AssertionError naming the broken promise. tests/test_contracts.py runs them over every
conf/attack and conf/defense YAML, and on deliberately broken components (they must fail)."""

from __future__ import annotations

import json
import math
from typing import Any

import torch
from torch import Tensor, nn

from bdrun.attacks.base import Attack
from bdrun.cache import content_key
from bdrun.context import RunContext
from bdrun.data.base import ImageSet, to_float
from bdrun.defenses.base import Defense
from bdrun.state import RunData


def changed_pixels(a: Tensor, b: Tensor) -> Tensor:
    """Bool [N, H, W]: where images a and b differ in any channel."""
    return (a != b).any(1)


def check_trigger_function(attack: Attack, x: Tensor) -> None:
    """apply_trigger is batched, keeps shape and range, leaves its input alone and gives the
    same output twice; an attack that stamps inputs changes every one of them, and only inside
    its declared region."""
    x = to_float(x)
    original = x.clone()
    out = attack.apply_trigger(x)
    assert torch.equal(x, original), "apply_trigger modified its input (it must be pure)"
    assert out.shape == x.shape, f"apply_trigger changed the shape {tuple(x.shape)}"
    assert out.min() >= 0 and out.max() <= 1, "apply_trigger left [0, 1]"
    assert torch.equal(attack.apply_trigger(x), out), "apply_trigger is not deterministic"
    if not attack.stamps_inputs:
        return
    changed = changed_pixels(out, x)
    assert changed.flatten(1).any(1).all(), "apply_trigger left some inputs unchanged"
    region = attack.trigger_region()
    if region is not None:
        outside = changed & ~region.any(0)
        assert not outside.any(), "apply_trigger changed pixels outside its trigger region"


def check_poisoned_set(attack: Attack, clean: ImageSet, poisoned: ImageSet, name: str) -> None:
    """The poisoned training set: shape, dtype and range kept; exactly round(rate * N) samples
    poisoned; only they differ from the clean data (inside the trigger region, every one of
    them where the attack stamps them now); labels follow the label mode; ground truth kept."""
    assert poisoned.x.shape == clean.x.shape and poisoned.x.dtype == clean.x.dtype
    as_float = to_float(poisoned.x)
    assert as_float.min() >= 0 and as_float.max() <= 1
    mask = poisoned.poison
    expected = 0 if name == "none" else round(attack.poison_rate * len(clean))
    assert int(mask.sum()) == expected, f"{int(mask.sum())} poisoned, expected {expected}"
    assert torch.equal(poisoned.orig_y, clean.y) and torch.equal(poisoned.index, clean.index)

    changed = changed_pixels(poisoned.x, clean.x)
    assert not changed[~mask].any(), "clean training samples were modified"
    if attack.stamps_inputs and not attack.triggers_in_training and expected:
        assert changed[mask].flatten(1).any(1).all(), "some poisoned samples carry no trigger"
    region = attack.trigger_region()
    if region is not None:
        assert not (changed & ~region.any(0)).any(), "poisoning changed pixels outside the region"

    relabelled = poisoned.y != clean.y
    assert not relabelled[~mask].any(), "clean samples were relabelled"
    if attack.clean_label:
        assert not relabelled.any(), "a clean-label attack relabelled samples"
        assert torch.all(clean.y[mask] == attack.target), "clean-label poisons outside the target"
    elif expected and name == "multi_trigger":  # each trigger has its own target
        targets = torch.tensor(attack.targets)[attack.trigger_of[mask]]
        assert torch.equal(poisoned.y[mask], targets) and torch.all(targets != clean.y[mask])
    elif expected:
        assert torch.equal(poisoned.y[mask], attack.backdoor_label(clean.y[mask]))
        if attack.label_mode == "all2all":
            assert torch.equal(poisoned.y[mask], (clean.y[mask] + 1) % attack.num_classes)


def check_backdoor_test(attack: Attack, test: ImageSet, backdoor: ImageSet, name: str) -> None:
    """Backdoor test inputs: labelled with a backdoor label different from the truth, and, for
    attacks that stamp inputs, each one differs from its clean test image."""
    if name == "none":
        return
    assert len(backdoor) > 0 and backdoor.poison.all()
    assert torch.all(backdoor.y != backdoor.orig_y), "a backdoor input keeps its true label"
    if attack.stamps_inputs:
        position = {int(i): row for row, i in enumerate(test.index.tolist())}
        rows = torch.tensor([position[int(i)] for i in backdoor.index.tolist()])
        changed = changed_pixels(backdoor.x, test.x[rows]).flatten(1).any(1)
        assert changed.all(), "some backdoor test inputs carry no trigger"


def state_of(model: nn.Module) -> dict[str, Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def assert_same_state(model: nn.Module, before: dict[str, Tensor], stage: str) -> None:
    now = model.state_dict()
    assert now.keys() == before.keys(), f"{stage} changed the given model's layers"
    for key, value in before.items():
        assert torch.equal(now[key].cpu(), value.cpu()), f"{stage} modified the given model ({key})"


def fingerprint(data: RunData) -> str:
    """A content hash of every tensor of the run's data."""
    sets = [data.train, data.holdout, data.test, data.backdoor_test]
    return content_key([[s.x, s.y, s.index, s.poison, s.orig_y] for s in sets])


def assert_plain_json(value: Any, where: str = "report()") -> None:
    """JSON-serialisable with plain types only (no tensors, no numpy scalars)."""
    try:
        json.dumps(value, allow_nan=True)
    except TypeError as err:
        raise AssertionError(f"{where} is not JSON-serialisable: {err}") from None


def check_defense(defense: Defense, model: nn.Module, data: RunData, ctx: RunContext) -> None:
    """Run every stage of `defense` as the runner does and check what it promises: keep-masks
    over the training set, the given model and the run's data left untouched, a model where a
    model is returned, one finite score per input from a detector, a plain-JSON report."""
    before, frozen = state_of(model), fingerprint(data)
    keep = defense.inspect_data(model, data, ctx)
    if keep is not None:
        assert keep.dtype == torch.bool and keep.shape == (len(data.train),), "bad keep-mask"
    assert_same_state(model, before, "inspect_data")
    train_set = data.train if keep is None else data.train.subset(keep)
    trained = defense.train(train_set, data, ctx)
    assert trained is None or isinstance(trained, nn.Module)
    repaired = defense.repair(model, data, ctx)
    assert isinstance(repaired, nn.Module), "repair must return a model"
    assert_same_state(model, before, "repair")
    detector = defense.detector(repaired, data, ctx)
    if detector is not None:
        for x in (data.test.x[:7], data.backdoor_test.x[:5]):
            scores = detector.score(x)
            assert scores.shape == (len(x),), f"{tuple(scores.shape)} scores for {len(x)} inputs"
            assert all(math.isfinite(v) for v in scores.tolist()), "a detector score is not finite"
            assert detector.rejects(x).shape == (len(x),)
    assert_same_state(model, before, "detector")
    assert fingerprint(data) == frozen, "a defense modified the run's data"
    assert_plain_json(defense.report())
