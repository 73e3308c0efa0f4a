"""Helpers between Hydra configs and objects: instantiate with user-friendly errors."""

from __future__ import annotations

from typing import Any

from omegaconf import DictConfig, OmegaConf

from bdrun.errors import BdrunError

# keys a component config may carry for bdrun's own use, never passed to the constructor
META_KEYS = ("name",)


def build(node: Any, what: str, **kwargs: Any) -> Any:
    """Instantiate a `_target_` config node; a bad config becomes a one-line BdrunError."""
    from hydra.errors import InstantiationException
    from hydra.utils import instantiate

    if isinstance(node, DictConfig):
        node = OmegaConf.to_container(node, resolve=True)
    node = {k: v for k, v in dict(node).items() if k not in META_KEYS}
    if "_target_" not in node:
        raise BdrunError(f"the {what} config has no _target_; it cannot be built")
    try:
        return instantiate(node, **kwargs)
    except InstantiationException as err:
        cause = err.__cause__
        if isinstance(cause, BdrunError):
            raise cause from None
        detail = str(cause or err).strip().splitlines()[-1]
        raise BdrunError(f"cannot build the {what} from its config: {detail}") from err


def component_name(node: Any, fallback: str) -> str:
    """The `name` a component config declares, else the fallback."""
    name = node.get("name") if hasattr(node, "get") else None
    return str(name) if name else fallback


def component_config(group: str, name: str) -> DictConfig:
    """conf/<group>/<name>.yaml as a config node, `_target_` included and its includes of the
    same group merged in (a variant such as badnets_pixel), interpolations left as written
    (`${oc.select:budget.x,D}` resolves against the run it joins)."""
    from bdrun.tuning import CONF_DIR

    path = CONF_DIR / group / f"{name}.yaml"
    if not path.is_file():
        raise BdrunError(f"no {group} named {name!r} (conf/{group}/{name}.yaml)")
    loaded = OmegaConf.load(path)
    merged = OmegaConf.create()
    own_first = True
    for entry in loaded.get("defaults") or []:
        if entry == "_self_":
            own_first = False
            continue
        merged = OmegaConf.merge(merged, component_config(group, str(entry)))
    own = OmegaConf.masked_copy(loaded, [k for k in loaded if k != "defaults"])
    return OmegaConf.merge(own, merged) if own_first else OmegaConf.merge(merged, own)


def component_node(group: str, name: str) -> dict[str, Any]:
    """What conf/<group>/<name>.yaml gives a component (`component_config`), interpolations
    resolved against an empty run (`${oc.select:budget.x,D}` -> D)."""
    return OmegaConf.to_container(component_config(group, name), resolve=True)


def component_values(group: str, name: str) -> dict[str, Any]:
    """component_node without `name` and `_target_`: the constructor's arguments. Component
    constructors declare no defaults of their own: these values are the only ones
    (tests/test_component_defaults.py)."""
    node = component_node(group, name)
    return {k: v for k, v in node.items() if k not in (*META_KEYS, "_target_")}


def component(group: str, name: str, **overrides: Any) -> Any:
    """The component conf/<group>/<name>.yaml builds, with `overrides` of its values: what a
    notebook or a test uses to get, say, a Strip defense with the YAML's settings but 20
    overlays (`component("defense", "strip", n_overlays=20)`)."""
    node = component_node(group, name)
    unknown = sorted(set(overrides) - set(node) - {*META_KEYS, "_target_"})
    if unknown:
        raise BdrunError(f"{group}.{unknown[0]} is not a setting of {group} {name}")
    return build({**node, **overrides}, group)
