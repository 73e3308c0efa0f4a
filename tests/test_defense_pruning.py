"""Channel ranking, masking and the fast masked evaluation behind prune / fine_pruning / goodnet."""

from __future__ import annotations

import copy
import csv

import pytest
import torch

from bdrun.config import build
from bdrun.defenses.prune import curve_counts, stop_count
from bdrun.defenses.pruning import (
    channel_activity,
    copy_model,
    make_permanent,
    mask_channels,
    masked_predictions,
    pruned_mask,
    pruning_order,
    resolve_site,
    split_after,
)
from bdrun.errors import BdrunError
from bdrun.models.probes import layer_outputs
from bdrun.models.small_cnn import SmallCNN

from conftest import compose_config, conf_options

NATURAL_SHAPE = {"deepid": (3, 55, 47), "small_cnn": (1, 8, 8), "lenet": (1, 28, 28)}


def model_named(name: str) -> tuple[torch.nn.Module, tuple[int, int, int]]:
    shape = NATURAL_SHAPE.get(name, (3, 32, 32))
    cfg = compose_config(f"model={name}")
    narrow = {"width": 8} if "width" in cfg.model else {}  # same layers, less arithmetic
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = build(
            cfg.model, "model", in_shape=shape, num_classes=5, mean=None, std=None, **narrow
        )
    return model.eval(), shape


def test_channels_are_ranked_by_mean_activation_least_active_first():
    model = SmallCNN((1, 8, 8), 3).eval()
    with torch.no_grad():  # conv2 outputs its bias everywhere: relu2 activity = relu(bias)
        model.conv2.weight.zero_()
        bias = torch.zeros(64)
        bias[:4] = torch.tensor([3.0, -1.0, 0.5, 2.0])
        bias[4:] = 10.0
        model.conv2.bias.copy_(bias)
    x = torch.rand(10, 1, 8, 8)
    activity = channel_activity(model, "relu2", x, batch_size=3)
    assert torch.allclose(activity[:4], torch.tensor([3.0, 0.0, 0.5, 2.0]))
    order = pruning_order(activity)
    assert order[:4].tolist() == [1, 2, 3, 0]
    # already-pruned channels drop out of the order; ties keep index order
    excluded = torch.zeros(64, dtype=torch.bool)
    excluded[[1, 3]] = True
    assert pruning_order(activity, exclude=excluded)[:3].tolist() == [2, 0, 4]
    assert pruned_mask(order, 2, 64).nonzero().flatten().tolist() == [1, 2]


@pytest.mark.parametrize("name", conf_options("model"))
def test_pruned_channels_output_exactly_zero_in_every_model(name):
    model, shape = model_named(name)
    site = resolve_site(model, None, None)
    x = torch.rand(4, *shape)
    before = layer_outputs(model, site.rank_layer, x)
    channels = before.shape[1]
    pruned = torch.zeros(channels, dtype=torch.bool)
    pruned[
        torch.randperm(channels, generator=torch.Generator().manual_seed(1))[: channels // 3]
    ] = True
    masked = mask_channels(copy.deepcopy(model), site, pruned)
    ranked = layer_outputs(masked, site.rank_layer, x)
    assert ranked[:, pruned].abs().max() == 0
    assert torch.allclose(ranked[:, ~pruned], before[:, ~pruned], atol=1e-5)
    prune_module = dict(masked.named_modules())[site.prune_layer]
    if isinstance(prune_module, torch.nn.Conv2d):  # the conv itself outputs zeros there
        assert layer_outputs(masked, site.prune_layer, x)[:, pruned].abs().max() == 0
    # the fast path (activations at the rank layer times a keep-mask) predicts the same labels
    keep = (~pruned).float()[None]
    fast = masked_predictions(model, site.rank_layer, x, keep, batch_size=3)[0]
    assert torch.equal(fast, masked(x).argmax(1))
    # folding the masks into the weights keeps the zeros and gives a plain state dict
    permanent = make_permanent(copy_model(masked))  # after a forward with gradients
    assert not any(key.endswith(("_orig", "_mask")) for key in permanent.state_dict())
    assert layer_outputs(permanent, site.rank_layer, x)[:, pruned].abs().max() == 0
    assert set(permanent.state_dict()) <= set(model.state_dict()) | {"channel_keep"}


def test_pruned_channels_stay_zero_while_fine_tuning():
    model = SmallCNN((1, 8, 8), 3)
    site = resolve_site(model, None, None)
    pruned = torch.zeros(64, dtype=torch.bool)
    pruned[::2] = True
    mask_channels(model, site, pruned)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    x, y = torch.rand(16, 1, 8, 8), torch.randint(0, 3, (16,))
    for _ in range(3):
        optimizer.zero_grad()
        torch.nn.functional.cross_entropy(model(x), y).backward()
        optimizer.step()
    assert model.conv2.weight[pruned].abs().max() == 0
    assert layer_outputs(model, "relu2", x)[:, pruned].abs().max() == 0
    # a second call replaces the set instead of stacking masks
    mask_channels(model, site, torch.zeros(64, dtype=torch.bool))
    assert model.conv2.weight_mask.min() == 1


def test_split_after_cuts_behind_relu_and_pooling():
    model = SmallCNN((1, 8, 8), 3).eval()
    head, tail = split_after(model, "relu2")
    x = torch.rand(5, 1, 8, 8)
    acts = layer_outputs(model, "relu2", x)
    assert head(acts).shape[2:] == (2, 2)  # pooled: masks apply to the smaller tensor
    assert torch.allclose(tail(head(acts)), model(x), atol=1e-5)


def test_unknown_layer_names_are_user_errors():
    model = SmallCNN((1, 8, 8), 3)
    with pytest.raises(BdrunError, match="no layer 'conv9'"):
        resolve_site(model, "conv9", None)


def test_accuracy_drop_stop_keeps_the_last_level_within_the_budget():
    acc = torch.tensor([0.90, 0.90, 0.89, 0.87, 0.86, 0.85, 0.70], dtype=torch.float64)
    assert stop_count(acc, 0.02) == 2  # 0.87 is 3 points down: stop before it
    assert stop_count(acc, 0.04) == 4  # exactly 4 points down is still within the budget
    assert stop_count(acc, 0.10) == 5
    assert stop_count(acc, 0.50) == 6  # never exceeded: everything
    assert curve_counts(64, 101) == list(range(65))
    assert curve_counts(512, 5, extra=[7]) == [0, 7, 128, 256, 384, 512]


def test_a_sweep_over_lr_and_prune_ratio_scores_the_pruning_curve_once(tmp_path):
    from bdrun.runner import run

    # a 5-level grid (0 / 16 / 32 / 48 / 64 of 64 channels), so stops fall off the grid
    base = ("defense=fine_pruning", "logger=none", "train.epochs=3", "defense.epochs=1")
    base += ("defense.curve_points=5",)
    runs = {
        "first": (),
        "other_lr": ("defense.lr=0.001",),
        "other_ratio": ("defense.prune_ratio=0.3",),
    }
    results = {
        name: run(compose_config(*base, *extra), tmp_path / name) for name, extra in runs.items()
    }
    status = {name: r["metrics"]["detection"]["curve_cache"] for name, r in results.items()}
    assert status == {"first": "miss", "other_lr": "hit", "other_ratio": "hit"}
    assert results["first"]["metrics"]["after"] != results["other_lr"]["metrics"]["after"]

    def curve(name):
        with open(tmp_path / name / "pruning_curve_fine_pruning.csv") as f:
            return {int(row["pruned"]): row for row in csv.DictReader(f)}

    first, other_ratio = curve("first"), curve("other_ratio")
    assert first == curve("other_lr")  # the same curve, written into every run folder
    assert 19 in other_ratio and 19 not in first  # round(0.3 * 64): its own stop, scored anew
    assert all(other_ratio[k] == first[k] for k in (0, 16, 32, 48, 64))  # the shared grid
