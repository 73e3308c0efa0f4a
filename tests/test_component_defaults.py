"""One value per component parameter: every conf/<group>/<name>.yaml lists each parameter of
its `_target_`'s constructor, with the constructor's own default, so a YAML default and a code
default cannot drift apart (the YAML is what `bdrun` runs; the default is what the Python API
gives). Parameters without a default are the ones the YAML must supply."""

from __future__ import annotations

import inspect
from typing import Any

import pytest
from hydra.utils import get_class
from omegaconf import OmegaConf

from conftest import compose_config, conf_options

GROUPS = ("attack", "defense")
META = {"name", "_target_"}


def signature_defaults(cls: type) -> tuple[dict[str, Any], bool]:
    """(name -> default of the explicit parameters of cls.__init__, whether it takes **kwargs);
    a dataclass's fields through its generated __init__."""
    params, takes_more = {}, False
    for name, param in inspect.signature(cls.__init__).parameters.items():
        if param.kind is inspect.Parameter.VAR_KEYWORD:
            takes_more = True
        elif name != "self" and param.kind is not inspect.Parameter.VAR_POSITIONAL:
            params[name] = param.default
    return params, takes_more


def constructor_defaults(cls: type) -> tuple[dict[str, Any], dict[str, Any]]:
    """(own, forwarded): the explicit parameters of cls.__init__, and those its **kwargs reach
    (the next base class with an __init__, or the classes named in `param_sources`: GoodNet
    hands its extra keys to FinePruning, Neural Cleanse to ReversalSettings); name -> default."""
    own, takes_more = signature_defaults(cls)
    if "__init__" not in cls.__dict__ and not hasattr(cls, "__dataclass_fields__"):
        return {}, own  # an inherited constructor: nothing of its own to list
    forwarded: dict[str, Any] = {}
    if takes_more:
        sources = getattr(cls, "param_sources", ()) or [
            next(base for base in cls.__mro__[1:] if "__init__" in base.__dict__)
        ]
        for source in sources:
            source_own, source_forwarded = constructor_defaults(source)
            for name, default in {**source_forwarded, **source_own}.items():
                if name not in own:
                    forwarded.setdefault(name, default)
    return own, forwarded


def cases() -> list[tuple[str, str]]:
    return [(group, name) for group in GROUPS for name in conf_options(group)]


@pytest.mark.parametrize("group, name", cases())
def test_yaml_values_are_the_constructor_defaults(group, name):
    # without the per-dataset tuning (tuning/attack_dataset/sig_digits.yaml changes the
    # default run's values on purpose)
    cfg = compose_config(f"{group}={name}", "tuning.enabled=false")
    node = OmegaConf.to_container(cfg[group], resolve=True)
    cls = get_class(node["_target_"])
    own, forwarded = constructor_defaults(cls)
    defaults = {**forwarded, **own}
    values = {k: v for k, v in node.items() if k not in META}
    unknown = sorted(set(values) - set(defaults))
    assert not unknown, f"{group}/{name}.yaml sets {unknown}, which {cls.__name__} does not take"
    if node.get("name") != getattr(cls, "name", None):
        return  # a variant (badnets_pixel is BadNets with pattern=pixel): values differ on purpose
    missing = sorted(set(own) - set(values))
    assert not missing, f"{group}/{name}.yaml does not list {missing} of {cls.__name__}"
    drifted = {
        key: (value, defaults[key])
        for key, value in values.items()
        if defaults[key] is not inspect.Parameter.empty and not same_value(value, defaults[key])
    }
    assert not drifted, f"{group}/{name}.yaml value vs {cls.__name__} default: {drifted}"


def same_value(yaml_value: Any, default: Any) -> bool:
    if isinstance(default, tuple):
        default = list(default)
    if isinstance(yaml_value, int | float) and isinstance(default, int | float):
        return float(yaml_value) == float(default)
    return yaml_value == default
