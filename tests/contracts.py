"""Behavioural contracts every attack and every defense must keep, as functions that raise an
AssertionError naming the broken promise. tests/test_contracts.py runs them over every
conf/attack and conf/defense YAML, and on deliberately broken components (they must fail)."""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from bdrun.attacks.base import Attack
from bdrun.cache import content_key
from bdrun.context import RunContext
from bdrun.data.base import ImageSet, to_float
from bdrun.defenses.base import Carried, Defense, Trained, Verdict
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
    """The poisoned training set: shape, dtype and range kept; exactly poison_count(N) samples
    poisoned (round(rate * N) unless the attack documents otherwise); only they and the
    attack's cover samples (trigger, true label, never poisoned) differ from the clean data
    (inside the trigger region, every one of them where the attack stamps them now); labels
    follow the label mode; ground truth kept."""
    assert poisoned.x.shape == clean.x.shape and poisoned.x.dtype == clean.x.dtype
    as_float = to_float(poisoned.x)
    assert as_float.min() >= 0 and as_float.max() <= 1
    mask = poisoned.poison
    expected = 0 if name == "none" else attack.poison_count(len(clean))
    assert int(mask.sum()) == expected, f"{int(mask.sum())} poisoned, expected {expected}"
    assert torch.equal(poisoned.orig_y, clean.y) and torch.equal(poisoned.index, clean.index)

    changed = changed_pixels(poisoned.x, clean.x)
    cover = attack.cover if attack.cover is not None else torch.zeros_like(mask)
    assert not (cover & mask).any(), "a cover sample is also poisoned"
    assert torch.equal(poisoned.y[cover], clean.y[cover]), "a cover sample was relabelled"
    if attack.stamps_inputs and cover.any():
        assert changed[cover].flatten(1).any(1).all(), "some cover samples carry no trigger"
    assert not changed[~mask & ~cover].any(), "clean training samples were modified"
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


def assert_plain_json(value: Any, where: str) -> None:
    """JSON-serialisable with plain types only (no tensors, no numpy scalars)."""
    try:
        json.dumps(value, allow_nan=True)
    except TypeError as err:
        raise AssertionError(f"{where} is not JSON-serialisable: {err}") from None


@dataclass
class DefenseOutputs:
    """What a defense's stages decided, as plain tensors: what the oracle check compares."""

    keep: Tensor | None = None
    trained: dict[str, Tensor] | None = None
    set_apart: Tensor | None = None
    verdict: tuple[list[int], list[float], float] | None = None
    repaired: dict[str, Tensor] = field(default_factory=dict)
    holdout_scores: Tensor | None = None
    threshold: float | None = None


def check_defense(
    defense: Defense, model: nn.Module, data: RunData, ctx: RunContext
) -> DefenseOutputs:
    """Run every stage of `defense` in the runner's order and check what it promises: keep-masks
    over the training set, set-apart masks over the set it trained on, a verdict with one
    anomaly index per label and a finite score, the given model and the run's data left
    untouched, a model where a model is returned, one finite score per input from a detector,
    plain-JSON figures. Returns the stages' outputs (check_no_oracle compares two runs)."""
    out = DefenseOutputs()
    before, frozen = state_of(model), fingerprint(data)
    keep = defense.inspect_data(model, data, ctx)
    if keep is not None:
        assert keep.dtype == torch.bool and keep.shape == (len(data.train),), "bad keep-mask"
        out.keep = keep.clone()
    assert_same_state(model, before, "inspect_data")
    train_set = data.train if keep is None else data.train.subset(keep)
    trained = defense.train(train_set, data, ctx)
    current = model
    if trained is not None:
        assert isinstance(trained, Trained) and isinstance(trained.model, nn.Module)
        current, out.trained = trained.model, state_of(trained.model)
        if trained.set_apart is not None:
            assert trained.set_apart.dtype == torch.bool
            assert trained.set_apart.shape == (len(train_set),), "bad set-apart mask"
            out.set_apart = trained.set_apart.clone()
    verdict = defense.inspect_model(current, data, ctx)
    if verdict is not None:
        assert isinstance(verdict, Verdict)
        assert len(verdict.anomaly_index) == ctx.info.num_classes, "one anomaly index per label"
        assert set(verdict.flagged_labels) <= set(range(ctx.info.num_classes))
        assert math.isfinite(verdict.score), "the verdict's model-level score is not finite"
        assert_plain_json(verdict.metrics(), "Verdict.metrics()")
        out.verdict = (list(verdict.flagged_labels), list(verdict.anomaly_index), verdict.score)
    assert_same_state(model, before, "inspect_model")
    carried = Carried(verdict=verdict, unrepaired=current)
    repaired = defense.repair(current, data, ctx, carried)
    assert isinstance(repaired, nn.Module), "repair must return a model"
    assert_same_state(model, before, "repair")
    out.repaired = state_of(repaired)
    detector = defense.detector(repaired, data, ctx, carried)
    if detector is not None:
        for x in (data.test.x[:7], data.backdoor_test.x[:5]):
            scores = detector.score(x)
            assert scores.shape == (len(x),), f"{tuple(scores.shape)} scores for {len(x)} inputs"
            assert all(math.isfinite(v) for v in scores.tolist()), "a detector score is not finite"
            assert detector.rejects(x).shape == (len(x),)
            measured = detector.measure(x)
            assert torch.equal(measured.scores, scores), "measure and score disagree"
            for name, part in measured.parts.items():
                assert len(part) == len(x), f"measure's part {name!r} is not one row per input"
        out.holdout_scores = detector.score(data.holdout.x)
        out.threshold = float(detector.threshold)
    assert_same_state(model, before, "detector")
    assert fingerprint(data) == frozen, "a defense modified the run's data"
    assert_plain_json(ctx.figures, "the recorded figures")
    return out


def noise_like(images: ImageSet, num_classes: int, g: torch.Generator) -> ImageSet:
    """The same number of images and labels, as uniform noise and random labels."""
    x = torch.rand(images.x.shape, generator=g)
    if images.x.dtype == torch.uint8:
        x = (x * 255).round().to(torch.uint8)
    return images.replace(
        x=x.to(images.x.dtype),
        y=torch.randint(num_classes, (len(images),), generator=g),
        orig_y=torch.randint(num_classes, (len(images),), generator=g),
    )


def with_noise_test_sets(data: RunData, ctx: RunContext) -> tuple[RunData, RunContext]:
    """The run with its test and backdoor test sets replaced by noise (and a scorer over those)."""
    g = torch.Generator().manual_seed(1234)
    classes = data.info.num_classes
    noisy = dataclasses.replace(
        data,
        test=noise_like(data.test, classes, g),
        backdoor_test=noise_like(data.backdoor_test, classes, g),
    )
    scorer = dataclasses.replace(
        ctx.scorer_or_fail(),
        test=noisy.test,
        backdoor_test=noisy.backdoor_test,
        extra=lambda _predict_fn: {},
    )
    return noisy, dataclasses.replace(ctx, scorer=scorer, figures={})


def check_no_oracle(real: DefenseOutputs, noise: DefenseOutputs) -> None:
    """A defense decides with the holdout only: what its stages returned with the real test sets
    equals what they returned with noise in their place."""
    for name in ("keep", "set_apart", "holdout_scores"):
        a, b = getattr(real, name), getattr(noise, name)
        assert (a is None) == (b is None) and (a is None or torch.equal(a, b)), (
            f"the defense's {name} depends on the test sets"
        )
    assert real.verdict == noise.verdict, "the defense's verdict depends on the test sets"
    assert real.threshold == noise.threshold, "the detector's threshold depends on the test sets"
    for name in ("trained", "repaired"):
        a, b = getattr(real, name), getattr(noise, name)
        assert (a is None) == (b is None), f"the {name} model depends on the test sets"
        if a is not None:
            assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), (
                f"the {name} model depends on the test sets"
            )
