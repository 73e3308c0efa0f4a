"""Attacks that act in training or train models of their own: hooks, cache entries, stages."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from torch import nn

from bdrun.attacks.pruning_aware import channel_stats
from bdrun.cache import ModelCache
from bdrun.data.base import to_float
from bdrun.models.probes import get_module
from bdrun.runner import prepare

from conftest import compose_config, poison_only

DIGITS = ("dataset=digits", "logger=none", "train.epochs=3")


def test_cache_stores_companion_modules_with_the_model(tmp_path):
    cache = ModelCache(tmp_path)
    trained_side = nn.Linear(2, 2)

    def train():
        with torch.no_grad():
            trained_side.weight.fill_(7.0)
        return nn.Linear(3, 1)

    model, status = cache.get_or_train("k", nn.Linear(3, 1), train, {}, {"side": trained_side})
    assert status == "miss"
    assert any(p.name.startswith("companion.side") for p in (tmp_path / "k").iterdir())
    fresh_side = nn.Linear(2, 2)
    loaded, status = cache.get_or_train("k", nn.Linear(3, 1), train, {}, {"side": fresh_side})
    assert status == "hit" and torch.equal(loaded.weight, model.weight)
    assert torch.all(fresh_side.weight == 7.0)
    # an entry without a companion the caller needs is no hit
    assert cache.load_into("k", nn.Linear(3, 1), {"other": nn.Linear(2, 2)}) is None


def test_wanet_noise_hook_warps_a_fixed_share_of_clean_rows_only(tmp_path):
    p = poison_only(tmp_path, "dataset=fake", "attack=wanet", "logger=none")
    (hook,) = p.ctx.attack_hooks
    module = SimpleNamespace(data=p.poisoned)
    pos = torch.arange(100)
    x, y = to_float(p.poisoned.x[pos]), p.poisoned.y[pos]
    hook.on_train_start(module)
    out, out_y = hook.on_batch(x, y, pos, module)
    changed = (out != x).flatten(1).any(1)
    assert int(changed.sum()) == round(100 * 0.1 * 2)  # batch * rho_a * cross_ratio
    assert not changed[p.poisoned.poison[pos]].any() and torch.equal(out_y, y)
    hook.on_train_start(module)  # every training run draws the same numbers
    again, _ = hook.on_batch(x, y, pos, module)
    assert torch.equal(again, out)


def test_wanet_backdoor_samples_carry_the_warp_in_the_training_set(tmp_path):
    p = poison_only(tmp_path, "dataset=fake", "attack=wanet", "logger=none")
    mask = p.poisoned.poison
    expected = p.attack.triggered(p.clean_train.x[mask])
    assert torch.equal(p.poisoned.x[mask], expected)
    assert torch.all(p.poisoned.y[mask] == 0)


def test_input_aware_cache_hit_restores_the_generator_and_the_backdoor_test_set(tmp_path):
    overrides = (*DIGITS, "attack=input_aware", "attack.mask_epochs=1")
    untrained_bd = poison_only(tmp_path / "u", *overrides).backdoor_test.x
    first = prepare(compose_config(*overrides), tmp_path / "a")
    assert first.model_status == "miss"
    trained_bd = first.data.backdoor_test
    assert not torch.equal(trained_bd.x, untrained_bd)  # built from the trained generator
    figures = first.ctx.evaluate(first.model)
    assert 0 <= figures["cross_acc"] <= 1

    second = prepare(compose_config(*overrides), tmp_path / "b")  # a new process would do this
    assert second.model_status == "hit"
    assert torch.equal(second.data.backdoor_test.x, trained_bd.x)
    assert second.ctx.evaluate(second.model) == figures


def test_input_aware_hook_triggers_backdoor_rows_and_cross_rows(tmp_path):
    p = poison_only(tmp_path, *DIGITS, "attack=input_aware", "attack.mask_epochs=0")
    (hook,) = p.ctx.attack_hooks
    # the classifier's schedule has brought its lr to a quarter of the initial one
    classifier_opt = torch.optim.SGD([torch.zeros(1)], lr=p.ctx.settings.lr / 4)
    trainer = SimpleNamespace(world_size=1, optimizers=[classifier_opt])
    module = SimpleNamespace(
        data=p.poisoned, device=torch.device("cpu"), trainer=trainer, settings=p.ctx.settings
    )
    hook.on_train_start(module)
    pos = torch.arange(200)
    x, y = to_float(p.poisoned.x[pos]), p.poisoned.y[pos]
    out, out_y = hook.on_batch(x, y, pos, module)
    changed = (out != x).flatten(1).any(1)
    poisoned = p.poisoned.poison[pos]
    assert changed[poisoned].all()  # every backdoor row gets its generated trigger
    assert int(changed[~poisoned].sum()) == round(200 * 0.1)  # cross rows: p_cross of the batch
    assert torch.equal(out_y, y) and torch.all(y[poisoned] == 0)
    assert out.requires_grad  # the generator learns through the classifier's loss
    assert hook.opt.param_groups[0]["lr"] == pytest.approx(p.attack.lr_pattern / 4)
    loss = hook.loss(torch.zeros(200, 10, requires_grad=True), y, pos, module)
    assert loss is not None and loss > 0  # cross-entropy plus the diversity term


def test_pruning_aware_reinstates_dormant_channels_and_caches_its_stages(tmp_path):
    overrides = (*DIGITS, "attack=pruning_aware")
    p = prepare(compose_config(*overrides), tmp_path / "a")
    model = p.model
    attack = p.attack
    assert p.model_status == "pretrained"
    assert attack.stage_status == {"clean": "miss", "retrain": "miss"}
    pruned = torch.tensor(attack.pruned_channels)
    assert len(pruned) == round(0.5 * get_module(model, "conv2").out_channels)
    _, peak = channel_stats(model, "relu2", p.data.train.x, 512, torch.device("cpu"))
    assert torch.all(peak[pruned] == 0)  # dormant on the attacker's (poisoned) training data
    metrics = p.ctx.evaluate(model)
    assert metrics["asr"] > 0.5

    again = prepare(compose_config(*overrides), tmp_path / "b")
    model_again = again.model
    assert again.attack.stage_status == {"clean": "hit", "retrain": "hit"}
    for a, b in zip(model.state_dict().values(), model_again.state_dict().values(), strict=True):
        assert torch.equal(a, b)


def test_multi_trigger_reports_asr_per_trigger(tmp_path):
    p = prepare(compose_config(*DIGITS, "attack=multi_trigger"), tmp_path)
    bd = p.data.backdoor_test
    sizes = [int((p.data.test.y != t).sum()) for t in p.attack.targets]
    assert len(bd) == sum(sizes)
    assert torch.equal(bd.y[: sizes[0]], torch.zeros(sizes[0], dtype=torch.long))
    assert torch.all(bd.y[sizes[0] : sizes[0] + sizes[1]] == 1)
    figures = p.attack.evaluate(lambda x: torch.ones(len(x), dtype=torch.long), p.data, p.ctx)
    assert figures["asr_trigger1"] == 1.0 and figures["asr_trigger0"] == 0.0
    assert figures["ra_trigger1"] == 0.0


def test_subpopulation_feature_match_and_damage_definitions(tmp_path):
    overrides = (
        *DIGITS,
        "attack=subpopulation",
        "attack.method=feature",
        "+attack.match={label: 3, brightness: 0}",
        "attack.bins=2",
    )
    p = prepare(compose_config(*overrides), tmp_path)
    attack, test = p.attack, p.data.test
    brightness = to_float(p.clean_train.x).flatten(1).mean(1)
    median = brightness.median()
    members = (p.clean_train.y == 3) & (brightness <= median)
    assert int((attack.train_members ^ members).sum()) <= 1  # a tie at the median may differ
    poisoned = p.data.train
    assert torch.all(poisoned.y[poisoned.poison] == attack.target)
    assert torch.all(p.clean_train.y[poisoned.poison] == 3)
    assert int(poisoned.poison.sum()) == int(
        (attack.train_members & (p.clean_train.y != attack.target)).sum()
    )
    bd = p.data.backdoor_test
    assert torch.all(bd.orig_y == 3) and len(bd) == int(
        (attack.test_members & (test.y != attack.target)).sum()
    )

    # the damage figures are accuracy drops against the clean model, inside and outside
    clean_in, clean_out = attack._clean_accuracy
    truth = lambda x: test.y.clone()  # noqa: E731 (a perfect model)
    perfect = attack.evaluate(truth, p.data, p.ctx)
    assert perfect["target_damage"] == pytest.approx(clean_in - 1.0)
    assert perfect["collateral_damage"] == pytest.approx(clean_out - 1.0)

    def wrong_inside(x):
        preds = test.y.clone()
        preds[attack.test_members] = (preds[attack.test_members] + 1) % 10
        return preds

    hurt = attack.evaluate(wrong_inside, p.data, p.ctx)
    assert hurt["target_damage"] == pytest.approx(clean_in)
    assert hurt["collateral_damage"] == pytest.approx(clean_out - 1.0)


def test_subpopulation_cluster_match_picks_a_cluster_present_in_train_and_test(tmp_path):
    p = poison_only(tmp_path, *DIGITS, "attack=subpopulation", "attack.clusters=20")
    attack = p.attack
    assert 0 <= attack.chosen_cluster < 20
    assert attack.train_members.any() and attack.test_members.any()
    assert p.poisoned.poison.sum() > 0 and len(p.backdoor_test) > 0
    assert attack.poison_rate == pytest.approx(int(p.poisoned.poison.sum()) / len(p.clean_train))
