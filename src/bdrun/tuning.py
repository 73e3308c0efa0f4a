"""Tuning files: settings that depend on two config groups, applied on top of the group defaults.

A tuning file holds keys of one component, at its top level:

    conf/tuning/dataset/<dataset>.yaml                    keys of `train`
    conf/tuning/attack_dataset/<attack>_<dataset>.yaml    keys of `attack`
    conf/tuning/defense_dataset/<defense>_<dataset>.yaml  keys of every defense of that name,
                                                          the first and each stacked one

Precedence, lowest first: the group's own YAML, its tuning file, `debug`, `experiment`, the
command line. What each tuning file changed is recorded in the config (`tuning.applied`: the
file, the keys it changed, and their default and tuned values), named in the run's summary
header and written to results.json. `tuning.enabled=false` runs the plain group defaults.

The files are applied here rather than through Hydra's defaults list because Hydra can name a
tuning file only from the choices of the list that holds it: a stacked defense
(`defense=[nad,abl]`, see bdrun.cli) would not get its own, and nothing would record what a file
changed.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, ListConfig, OmegaConf, open_dict

import bdrun.conf
from bdrun.errors import BdrunError

CONF_DIR = Path(bdrun.conf.__file__).resolve().parent
TUNING_DIR = CONF_DIR / "tuning"
STACK_KEY = "defense_stack"  # extra defenses of `defense=[a,b]` (see bdrun.cli)
# groups whose files set keys above tuning (debug, experiment), and every group a user picks from
LATER_GROUPS = ("debug", "experiment")
USER_GROUPS = (
    "dataset",
    "model",
    "attack",
    "defense",
    "trainer",
    "logger",
    *LATER_GROUPS,
    "population",
)


def leaves(node: Any, prefix: str = "") -> Iterator[tuple[str, Any]]:
    """(dotted key, value) of every leaf of a mapping; lists are leaves."""
    if isinstance(node, Mapping):
        for key, value in node.items():
            yield from leaves(value, f"{prefix}{key}.")
    else:
        yield prefix[:-1], node


def tuning_targets(cfg: DictConfig, choices: Mapping[str, Any]) -> list[tuple[str, str]]:
    """(tuning file relative to conf/, config node it tunes) for this run, existing or not."""
    dataset = choices.get("dataset")
    targets = [(f"tuning/dataset/{dataset}.yaml", "train")]
    targets.append((f"tuning/attack_dataset/{choices.get('attack')}_{dataset}.yaml", "attack"))
    targets.append((f"tuning/defense_dataset/{choices.get('defense')}_{dataset}.yaml", "defense"))
    for name in cfg.get(STACK_KEY) or {}:
        targets.append((f"tuning/defense_dataset/{name}_{dataset}.yaml", f"{STACK_KEY}.{name}"))
    return targets


def group_file_keys(group: str, name: str) -> set[str]:
    """The config keys a `debug` or `experiment` file sets (its own and those of the files of its
    group it includes), as dotted paths from the config root."""
    path = CONF_DIR / group / f"{name}.yaml"
    if not path.is_file():
        return set()
    text = path.read_text()
    content = OmegaConf.to_container(OmegaConf.create(text), resolve=False) or {}
    keys: set[str] = set()
    for entry in content.get("defaults") or []:
        if isinstance(entry, str) and entry != "_self_":
            keys |= group_file_keys(group, entry)
    package = "" if "@package _global_" in text.split("\n", 1)[0] else f"{group}."
    body = {k: v for k, v in content.items() if k != "defaults"}
    return keys | {f"{package}{key}" for key, _ in leaves(body)}


def override_keys(overrides: Sequence[str]) -> set[str]:
    """The config keys that command-line overrides set (group choices and hydra.* left out)."""
    keys = set()
    for override in overrides:
        key = override.split("=", 1)[0].lstrip("+~")
        if not key or "/" in key or "@" in key or key in USER_GROUPS or key.startswith("hydra"):
            continue
        keys.add(key)
    return keys


def is_protected(key: str, protected: set[str]) -> bool:
    """Whether `key` or a node above it is set by a later layer."""
    parts = key.split(".")
    return any(".".join(parts[:i]) in protected for i in range(1, len(parts) + 1))


def plain(value: Any) -> Any:
    if isinstance(value, DictConfig | ListConfig):
        return OmegaConf.to_container(value, resolve=True)
    return value


def apply_tuning(
    cfg: DictConfig, choices: Mapping[str, Any], overrides: Sequence[str] = ()
) -> list[dict[str, Any]]:
    """Apply this run's tuning files to `cfg` (in place) below debug, experiment and the command
    line (`overrides`, Hydra's override strings); record and return what each file changed."""
    applied: list[dict[str, Any]] = []
    tuning = cfg.get("tuning")
    if tuning is None or "enabled" not in tuning:
        raise BdrunError("the config has no tuning.enabled; set tuning.enabled=true or false")
    if not isinstance(tuning.enabled, bool):
        raise BdrunError(f"tuning.enabled={tuning.enabled!r} must be true or false")
    if tuning.enabled:
        protected = override_keys(overrides)
        for group in LATER_GROUPS:
            if choices.get(group):
                protected |= group_file_keys(group, str(choices[group]))
        for relative, node in tuning_targets(cfg, choices):
            path = CONF_DIR / relative
            if not path.is_file():
                continue
            changed: dict[str, dict[str, Any]] = {}
            for key, value in leaves(OmegaConf.to_container(OmegaConf.load(path))):
                full = f"{node}.{key}"
                if is_protected(full, protected):
                    continue
                old = plain(OmegaConf.select(cfg, full, default=None))
                if old != value:
                    with open_dict(cfg):
                        OmegaConf.update(cfg, full, value, merge=False)
                    changed[full] = {"default": old, "tuned": plain(value)}
            if changed:
                applied.append({"file": relative, "changed": list(changed), "values": changed})
    with open_dict(cfg):
        cfg.tuning.applied = applied
    return applied


def applied_tuning(cfg: DictConfig | Mapping[str, Any]) -> list[dict[str, Any]]:
    """What apply_tuning recorded in `cfg`; an error when the config never went through it."""
    tuning = cfg.get("tuning") or {}
    if "applied" not in tuning:
        raise RuntimeError(
            "the config was composed without bdrun's tuning step; compose it with "
            "bdrun.compose.compose_config (or run it through the bdrun command)"
        )
    return list(plain(tuning["applied"]))


def tuning_line(applied: Sequence[Mapping[str, Any]], enabled: bool = True) -> str | None:
    """One line for a summary header: the tuning files applied and the keys each changed."""
    if not enabled:
        return "tuning: off (tuning.enabled=false: the plain group defaults)"
    parts = [f"{entry['file']} ({', '.join(entry['changed'])})" for entry in applied]
    return f"tuning: {'; '.join(parts)}" if parts else None
