"""Each default is written once, in YAML: a component's conf/<group>/<name>.yaml gives every value
its constructor takes, and no constructor (nor a settings dataclass) declares a default of its
own, so a YAML value and a code value cannot drift apart. Code that builds a component or a
settings object outside a run reads the same YAML (bdrun.config.component,
bdrun.training.train_settings / hardware_settings)."""

from __future__ import annotations

import dataclasses
import inspect

import pytest
from hydra.utils import get_class
from omegaconf import OmegaConf

from bdrun.config import component, component_values
from bdrun.defenses.trigger_reversal import ReversalSettings
from bdrun.errors import BdrunError
from bdrun.training import HardwareSettings, TrainSettings, hardware_settings, train_settings
from bdrun.tuning import CONF_DIR

from conftest import compose_config, conf_options

GROUPS = ("attack", "defense")


def cases() -> list[tuple[str, str]]:
    return [(group, name) for group in GROUPS for name in conf_options(group)]


def component_class(group: str, name: str) -> type:
    node = compose_config(f"{group}={name}", "tuning.enabled=false")[group]
    return get_class(node["_target_"])


@pytest.mark.parametrize("group, name", cases())
def test_a_component_is_built_from_its_yaml_alone(group, name):
    values = component_values(group, name)
    built = component(group, name)  # a missing or unknown parameter fails here
    assert type(built) is component_class(group, name)
    if values:
        key = next(iter(values))
        with pytest.raises(BdrunError, match="is not a setting of"):
            component(group, name, **{f"{key}_typo": 1})


@pytest.mark.parametrize("group, name", cases())
def test_component_constructors_declare_no_defaults(group, name):
    cls = component_class(group, name)
    for owner in cls.__mro__:
        if "__init__" not in owner.__dict__ or not owner.__module__.startswith("bdrun."):
            continue
        defaults = [
            parameter
            for parameter, spec in inspect.signature(owner.__init__).parameters.items()
            if spec.default is not inspect.Parameter.empty
        ]
        assert not defaults, (
            f"{owner.__name__}.__init__ declares defaults for {defaults}: "
            f"they belong in conf/{group}/*.yaml only"
        )


def test_the_yaml_run_and_the_python_api_get_the_same_values():
    cfg = compose_config("defense=strip", "tuning.enabled=false")
    values = {k: v for k, v in OmegaConf.to_container(cfg.defense).items() if k != "_target_"}
    values.pop("name")
    assert values == component_values("defense", "strip")
    assert component("defense", "strip", n_overlays=7).n_overlays == 7


@pytest.mark.parametrize("settings", [TrainSettings, HardwareSettings, ReversalSettings])
def test_settings_dataclasses_declare_no_defaults(settings):
    with_defaults = [
        f.name
        for f in dataclasses.fields(settings)
        if f.default is not dataclasses.MISSING or f.default_factory is not dataclasses.MISSING
    ]
    assert not with_defaults, f"{settings.__name__} declares defaults for {with_defaults}"


def test_train_and_trainer_yaml_give_every_setting():
    train = OmegaConf.load(CONF_DIR / "config.yaml").train
    assert set(train) == {f.name for f in dataclasses.fields(TrainSettings)}
    assert train_settings(epochs=3).epochs == 3 and train_settings().lr == train.lr
    for name in conf_options("trainer"):
        trainer = OmegaConf.load(CONF_DIR / "trainer" / f"{name}.yaml")
        assert set(trainer) == {f.name for f in dataclasses.fields(HardwareSettings)}, name
    assert hardware_settings("gpu").precision == "16-mixed"
    with pytest.raises(BdrunError, match="unknown trainer setting 'warp'"):
        hardware_settings(warp=9)
