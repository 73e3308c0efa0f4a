"""Behavioural contract tests over every conf/attack and conf/defense YAML (tests/contracts.py
says what each promise is), and proof that they catch broken components: an attack whose
trigger does nothing and a defense that zeroes the cached model in place both fail them."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from torch import Tensor, nn

from bdrun.attacks.badnets import BadNets
from bdrun.defenses.base import NOTHING_CARRIED
from bdrun.defenses.finetune import FineTune
from bdrun.loggers import RunLogger
from bdrun.runner import Prepared, build_defenses, prepare

from conftest import NEEDS_BATCH_NORM, attack_overrides, compose_config, conf_options, poison_only
from contracts import (
    DefenseOutputs,
    check_backdoor_test,
    check_defense,
    check_no_oracle,
    check_poisoned_set,
    check_trigger_function,
    with_noise_test_sets,
)

ATTACKS = conf_options("attack")
DEFENSES = conf_options("defense")
# random 16x16 colour images: every trigger changes every image it touches
FAKE = ("dataset=fake", "dataset.source.shape=[3,16,16]", "dataset.source.n_train=600")
DIGITS_SMOKE = ("debug=smoke", "logger=none")


class InertBadNets(BadNets):
    """Sabotaged: the trigger function returns its input unchanged."""

    def apply_trigger(self, x: Tensor) -> Tensor:
        return x


class ZeroingFineTune(FineTune):
    """Sabotaged: zeroes the model it is given in place, then fine-tunes it."""

    def repair(self, model: nn.Module, data, ctx, carried=NOTHING_CARRIED) -> nn.Module:
        with torch.no_grad():
            for parameter in model.parameters():
                parameter.zero_()
        return super().repair(model, data, ctx, carried)


class PeekingFineTune(FineTune):
    """Sabotaged: picks its fine-tuning epochs from the clean test set (an oracle)."""

    def repair(self, model: nn.Module, data, ctx, carried=NOTHING_CARRIED) -> nn.Module:
        self.epochs = 1 + int(data.test.y[:8].sum()) % 3
        return super().repair(model, data, ctx, carried)


def attack_contract(tmp_path, name: str, *overrides: str) -> None:
    extra = attack_overrides(name, tmp_path, *FAKE)  # a pretrained model and its poisoned file
    first = poison_only(tmp_path / "a", *FAKE, f"attack={name}", *extra, *overrides)
    attack, test = first.attack, first.setup.splits.test
    if attack.stamps_inputs:
        check_trigger_function(attack, test.x[:32])
    check_poisoned_set(attack, first.clean_train, first.poisoned, name)
    check_backdoor_test(attack, test, first.backdoor_test, name)
    again = poison_only(tmp_path / "b", *FAKE, f"attack={name}", *extra, *overrides)
    assert torch.equal(again.poisoned.x, first.poisoned.x), "poisoning differs for one seed"
    assert torch.equal(again.poisoned.y, first.poisoned.y)
    assert torch.equal(again.backdoor_test.x, first.backdoor_test.x)


@pytest.mark.parametrize("name", ATTACKS)
def test_attack_contract(name, tmp_path):
    attack_contract(tmp_path, name)


def test_the_attack_contract_catches_a_trigger_that_does_nothing(tmp_path):
    with pytest.raises(AssertionError, match="unchanged"):
        attack_contract(tmp_path, "badnets", "attack._target_=test_contracts.InertBadNets")


@pytest.fixture(scope="module")
def poisoned_run(tmp_path_factory) -> Prepared:
    """One smoke-sized BadNets model on digits, shared by every defense's contract test."""
    return prepare(compose_config(*DIGITS_SMOKE), tmp_path_factory.mktemp("poisoned-run"))


@pytest.fixture(scope="module")
def poisoned_bn_run(tmp_path_factory) -> Prepared:
    """The same with model=small_cnn_bn, for the defenses in NEEDS_BATCH_NORM."""
    return prepare(
        compose_config(*DIGITS_SMOKE, "model=small_cnn_bn"), tmp_path_factory.mktemp("bn-run")
    )


def run_for(name: str, request: pytest.FixtureRequest) -> Prepared:
    return request.getfixturevalue(
        "poisoned_bn_run" if name in NEEDS_BATCH_NORM else "poisoned_run"
    )


def defense_outputs(
    prepared: Prepared, folder, name: str, *overrides: str, noise: bool = False
) -> DefenseOutputs:
    """A fresh instance of defense `name` through check_defense on the shared run (its test sets
    replaced by noise when `noise`)."""
    (defense,) = build_defenses(compose_config(*DIGITS_SMOKE, f"defense={name}", *overrides))
    folder.mkdir(parents=True, exist_ok=True)
    ctx = dataclasses.replace(prepared.ctx.for_defense(), run_dir=folder, logger=RunLogger(folder))
    data = prepared.data
    if noise:
        data, ctx = with_noise_test_sets(data, ctx)
    return check_defense(defense, prepared.model, data, ctx)


def defense_contract(prepared: Prepared, tmp_path, name: str, *overrides: str) -> None:
    defense_outputs(prepared, tmp_path, name, *overrides)


def no_oracle(prepared: Prepared, tmp_path, name: str, *overrides: str) -> None:
    """What the defense decides is the same with the test sets replaced by noise."""
    real = defense_outputs(prepared, tmp_path / "real", name, *overrides)
    noise = defense_outputs(prepared, tmp_path / "noise", name, *overrides, noise=True)
    check_no_oracle(real, noise)


@pytest.mark.parametrize("name", DEFENSES)
def test_defense_contract(name, request, tmp_path):
    defense_contract(run_for(name, request), tmp_path, name)


@pytest.mark.slow
@pytest.mark.parametrize("name", DEFENSES)
def test_no_defense_reads_the_test_sets(name, request, tmp_path):
    no_oracle(run_for(name, request), tmp_path, name)


def test_the_defense_contract_catches_a_defense_that_reads_the_test_set(poisoned_run, tmp_path):
    with pytest.raises(AssertionError, match="repaired model depends on the test sets"):
        no_oracle(
            poisoned_run, tmp_path, "finetune", "defense._target_=test_contracts.PeekingFineTune"
        )


def test_the_defense_contract_catches_a_repair_that_changes_the_given_model(poisoned_run, tmp_path):
    model = poisoned_run.model
    saved = {k: v.clone() for k, v in model.state_dict().items()}
    try:
        with pytest.raises(AssertionError, match="repair modified the given model"):
            defense_contract(
                poisoned_run,
                tmp_path,
                "finetune",
                "defense._target_=test_contracts.ZeroingFineTune",
            )
    finally:
        model.load_state_dict(saved)  # the other tests share this model
