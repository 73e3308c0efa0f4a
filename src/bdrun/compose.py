"""From a command line to the config a run executes: bdrun's own override forms, Hydra's
composition, then the tuning files (bdrun.tuning).

The `bdrun` command, the tests and notebooks compose through `compose_config`, so every run sees
the same config for the same overrides. Hydra's own runs (`bdrun ...`, sweeps, Slurm jobs)
compose in hydra.main; bdrun.cli applies the tuning there with `apply_tuning`.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping, Sequence
from typing import Any

from omegaconf import DictConfig, open_dict

from bdrun.errors import BdrunError
from bdrun.tuning import CONF_DIR, STACK_KEY, apply_tuning


def rewrite_defense_stack(args: Sequence[str]) -> list[str]:
    """Turn `defense=[a,b,...]` into `defense=a` plus one `+defense@defense_stack.X=X` per extra
    (Hydra would otherwise merge both configs into one node)."""
    out = []
    for arg in args:
        key, sep, value = arg.partition("=")
        value = value.strip()
        if key == "defense" and sep and value.startswith("["):
            if not value.endswith("]") or value.count("[") != 1:
                raise BdrunError(
                    f"cannot read {arg!r}: stack defenses as defense=[a,b] (one list, not swept)"
                )
            names = [v.strip() for v in value[1:-1].split(",") if v.strip()]
            if not names:
                raise BdrunError("defense=[] is empty; use defense=none")
            if len(set(names)) != len(names):
                raise BdrunError(f"{arg}: each defense may appear once in a stack")
            out.append(f"defense={names[0]}")
            out += [f"+defense@{STACK_KEY}.{name}={name}" for name in names[1:]]
        else:
            out.append(arg)
    return out


def compose_with_hydra(args: Sequence[str]) -> DictConfig:
    """Hydra's composition of `args` (bdrun's own forms already rewritten), `hydra` node kept."""
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(version_base=None, config_dir=str(CONF_DIR)):
        return compose("config", overrides=list(args), return_hydra_config=True)


def apply_job(cfg: DictConfig, choices: Mapping[str, Any], args: Sequence[str]) -> None:
    """The tuning files (bdrun.tuning), in place; for one job of a population
    (`population.member=i`) the member's attack, draws and seed first (bdrun.population)."""
    from bdrun import population

    if population.is_member(cfg):
        population.apply_member(cfg, choices, args)
    else:
        apply_tuning(cfg, choices, args)


def job_config(composed: DictConfig, args: Sequence[str]) -> DictConfig:
    """The run's config from Hydra's composition: `hydra` node removed, tuning files applied
    (`apply_job`)."""
    choices = dict(composed.hydra.runtime.choices)
    cfg = copy.deepcopy(composed)  # a shallow copy would break relative interpolations
    with open_dict(cfg):
        del cfg["hydra"]
    apply_job(cfg, choices, args)
    return cfg


def compose_config(overrides: Sequence[str] = ()) -> DictConfig:
    """The config `bdrun OVERRIDES...` runs: composed by Hydra, tuning files applied (without
    Hydra's own `hydra` node)."""
    args = rewrite_defense_stack(overrides)
    return job_config(compose_with_hydra(args), args)
