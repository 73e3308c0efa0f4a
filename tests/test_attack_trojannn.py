"""TrojanNN: masks, neuron selection, the optimised trigger, and a run end to end (digits)."""

from __future__ import annotations

import pytest
import torch

from bdrun.attacks.triggers import stamp
from bdrun.attacks.trojannn import (
    connection_strength,
    neuron_activations,
    square_mask,
    watermark_mask,
)
from bdrun.config import component
from bdrun.data.base import to_float
from bdrun.errors import BdrunError
from bdrun.runner import run

from conftest import compose_config, poison_only

# the surrogate trains 3 epochs, the trigger 100 steps: seconds on digits
DIGITS = ("attack=trojannn", "logger=none", "train.epochs=3", "attack.steps=100", "attack.size=3")


def test_square_mask_sits_in_the_corner():
    mask = square_mask(3, "bottom_right", 1, 8, 8)
    assert mask.shape == (1, 8, 8) and int(mask.sum()) == 9
    assert torch.all(mask[0, 4:7, 4:7] == 1)
    assert square_mask(2, [0, 1], 0, 8, 8)[0, 0:2, 1:3].sum() == 4


def test_watermark_mask_is_a_ring_crossed_by_a_bar():
    mask = watermark_mask(8, 8)[0]
    rows = ["...##...", "..#..#..", ".######.", ".#....#.", "..#..#..", "...##..."]
    drawn = ["".join("#" if v else "." for v in row) for row in mask.int().tolist()]
    assert drawn == ["........", *rows, "........"]
    big = watermark_mask(28, 28)
    assert set(big.unique().tolist()) == {0.0, 1.0} and 0.05 < big.mean() < 0.15


def test_connection_strength_sums_the_absolute_weights_that_read_each_neuron():
    linear = torch.tensor([[1.0, -2.0], [3.0, 0.5]])  # [out, neurons]
    assert torch.equal(connection_strength(linear, 2), torch.tensor([4.0, 2.5]))
    conv = torch.tensor([[[[1.0]], [[-1.0]]], [[[2.0]], [[0.0]]]])  # [out 2, in 2, 1, 1]
    assert torch.equal(connection_strength(conv, 2), torch.tensor([3.0, 1.0]))
    flattened = torch.tensor([[1.0, 1.0, -4.0, 0.0]])  # 2 channels x 2 positions, flattened
    assert torch.equal(connection_strength(flattened, 2), torch.tensor([2.0, 4.0]))
    with pytest.raises(BdrunError, match="does not read the 3 neurons"):
        connection_strength(linear, 3)


@pytest.fixture(scope="module", params=["square", "watermark"])
def fitted(request, tmp_path_factory):
    tmp = tmp_path_factory.mktemp(request.param)
    return poison_only(tmp, *DIGITS, f"attack.mask={request.param}")


def test_the_trigger_changes_only_pixels_inside_the_mask(fitted):
    attack, x = fitted.attack, to_float(fitted.setup.splits.test.x[:50])
    out = attack.apply_trigger(x)
    changed = (out != x).any(1).any(0)  # [H, W]: pixels changed in any image
    inside = attack.trigger_mask[0].bool()
    assert not changed[~inside].any()
    assert torch.equal(out[:, :, inside], attack.pattern[:, inside].expand(len(x), -1, -1))
    assert out.min() >= 0 and out.max() <= 1


def test_apply_trigger_is_pure_and_deterministic(fitted, tmp_path):
    attack, x = fitted.attack, to_float(fitted.setup.splits.test.x[:20])
    before = x.clone()
    first, second = attack.apply_trigger(x), attack.apply_trigger(x)
    assert torch.equal(x, before) and torch.equal(first, second)
    mask = "watermark" if attack.mask == "watermark" else "square"
    again = poison_only(tmp_path, *DIGITS, f"attack.mask={mask}")
    assert torch.equal(again.attack.pattern, attack.pattern)
    assert torch.equal(again.poisoned.x, fitted.poisoned.x)


def test_the_optimised_trigger_excites_the_chosen_neurons_more_than_a_random_one(fitted):
    attack, ctx = fitted.attack, fitted.ctx
    surrogate, status = ctx.train_cached(fitted.clean_train, stream="surrogate")
    assert status == "hit"  # the model the trigger was optimised against
    random_pattern = torch.rand(attack.pattern.shape, generator=torch.Generator().manual_seed(0))

    def chosen_mean(images):
        with torch.no_grad():
            return neuron_activations(surrogate.eval(), None, images)[
                :, attack.neuron_indices
            ].mean()

    def with_random(images):
        return stamp(images, random_pattern, attack.trigger_mask, 0, 0)

    # on the image it was optimised on (measured 1.4 vs 0.56 square, 2.1 vs 0.72 watermark) ...
    background = attack.optimised_on
    assert chosen_mean(attack.apply_trigger(background)) > 2 * chosen_mean(with_random(background))
    # ... and on real digits (2.8 vs 2.2, 3.1 vs 1.6)
    x = to_float(fitted.setup.splits.test.x[:200])
    assert chosen_mean(attack.apply_trigger(x)) > 1.2 * chosen_mean(with_random(x))
    # the chosen neurons are those the classifier's weights read most strongly
    strength = surrogate.classifier.weight.abs().sum(0)
    assert set(attack.neuron_indices.tolist()) == set(
        strength.topk(attack.neurons).indices.tolist()
    )


def test_a_run_end_to_end_backdoors_the_model(tmp_path):
    results = run(compose_config(*DIGITS), tmp_path)  # the surrogate comes from the cache
    before = results["metrics"]["before"]
    assert results["attack"] == "trojannn"
    assert results["poison"]["train_poisoned"] == round(0.1 * results["poison"]["train_size"])
    # 3 epochs, a 3x3 trigger on 8x8 digits: measured ASR 99.6 %, CCA 83.7 %
    assert before["asr"] >= 0.9 and before["cca"] >= 0.8


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"mask": "circle"}, "attack.mask='circle' must be one of square, watermark"),
        ({"size": 0}, "attack.size=0 must be >= 1"),
        ({"margin": -1}, "attack.margin=-1 must be >= 0"),
        ({"neurons": 0}, "attack.neurons=0 must be >= 1"),
        ({"target_value": 0}, "attack.target_value=0 must be > 0"),
        ({"steps": 0}, "attack.steps=0 must be >= 1"),
        ({"lr": -0.1}, "attack.lr=-0.1 must be > 0"),
        ({"background": "white"}, "attack.background='white' must be one of gray, black"),
        ({"layer": "fc1"}, "attack.layer=fc1 needs attack.next_layer"),
    ],
)
def test_bad_parameters_are_user_errors(kwargs, message):
    with pytest.raises(BdrunError, match=message.replace("(", r"\(")):
        component("attack", "trojannn", **kwargs)


@pytest.mark.parametrize(
    "overrides, message",
    [
        (("attack.size=9",), "does not fit 8x8 images"),
        (("attack.neurons=500",), "attack.neurons=500 exceeds the 128 neurons"),
        (("attack.layer=fc9", "attack.next_layer=classifier"), "model has no layer 'fc9'"),
        (("attack.layer=conv2", "attack.next_layer=conv1"), "does not read the 64 neurons"),
    ],
)
def test_parameters_that_do_not_fit_the_data_or_model_are_user_errors(overrides, message, tmp_path):
    with pytest.raises(BdrunError, match=message):
        poison_only(tmp_path, *DIGITS, *overrides)


def test_a_conv_layer_ranked_by_the_next_layer_works(tmp_path):
    p = poison_only(tmp_path, *DIGITS, "attack.layer=relu2", "attack.next_layer=fc1")
    assert len(p.attack.neuron_indices) == 2 and int(p.attack.neuron_indices.max()) < 64
