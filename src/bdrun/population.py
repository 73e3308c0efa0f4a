"""Model populations: many clean and backdoored models from one config, each inspected by every
model inspector, for detection benchmarks (TrojAI, the Trojan Detection Challenge).

A population config (`conf/population/<name>.yaml`, node `population`) names the count of clean
and of backdoored models, the attack families and the ranges their settings are drawn from, the
inspectors, and the population seed. Member i of the population is one model:

- whether it is backdoored: a permutation of the members drawn from the population seed (stream
  `population-labels`) makes the first `backdoored` of it backdoored, so a member's number says
  nothing about its label;
- its family: the families, in an order drawn from the seed, cycle over the backdoored members
  (in the label permutation's order), so their counts differ by one at most; every setting of
  the family's `draw` comes from stream `population-draw-<i>`: a list is a choice, `{low, high}` a uniform
  value (integers, both ends included, when both are integers);
- its training seed (stream `population-seed-<i>`), drawn the same way for clean and
  backdoored members: clean members train with `attack=none` and the same recipe;
- its model id, from another permutation (stream `population-ids`): the name of its weights file.

One job of the sweep is one (member, inspector) pair (`population.member=i defense=<name>`):
`apply_member` turns the composed config into the member's (attack node, drawn settings, seed,
the inspector's population settings) before the tuning files; the model trains through the
model cache, so the inspectors of one member share one training. The job also writes the
member's weights, and nothing else, to `<population folder>/models/<model id>.safetensors`
(`save_member_model`): every member's file has the same keys, dtypes and shapes and no metadata,
BatchNorm's `num_batches_tracked` is dropped (a step count can tell trainings apart), and the
architecture is written once beside them. The labels are in results.json, never in the files.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf, open_dict
from torch import nn

from bdrun.config import component_config
from bdrun.errors import BdrunError
from bdrun.fs import atomic_file
from bdrun.results import RESULTS_FILE
from bdrun.rng import derive_seed, generator
from bdrun.tuning import CONF_DIR, apply_tuning

KEY = "population"
MODELS_DIR = "models"
ARCHITECTURE_FILE = "architecture.json"
DROPPED_BUFFERS = ("num_batches_tracked",)  # counts steps: not part of what a model computes


@dataclass(frozen=True)
class Member:
    """One model of a population (see the module docstring)."""

    index: int
    model_id: str
    backdoored: bool
    family: str  # "clean" for clean members
    attack: str  # the attack group option ("none" for clean members)
    values: dict[str, Any]  # drawn attack settings
    seed: int

    @property
    def target(self) -> int | None:
        return self.values.get("target") if self.backdoored else None


def _options(group: str) -> set[str]:
    return {p.stem for p in (CONF_DIR / group).glob("*.yaml")}


def _count(node: Mapping[str, Any], key: str, minimum: int) -> int:
    value = node.get(key)
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise BdrunError(f"population.{key}={value!r} must be an integer >= {minimum}")
    return value


def active_families(node: Mapping[str, Any]) -> dict[str, Any]:
    """The population's families; one set to null (a population that includes another and
    leaves one of its families out) is left out."""
    families = node.get("families")
    if not isinstance(families, Mapping):
        return {}
    return {name: family for name, family in families.items() if family is not None}


def check_population(node: Mapping[str, Any]) -> None:
    """A one-line BdrunError for a population config that cannot be drawn from."""
    _count(node, "clean", 1)
    _count(node, "backdoored", 1)
    _count(node, "seed", 0)
    families = active_families(node)
    if not families:
        raise BdrunError("population.families is empty; name at least one attack family")
    attacks = _options("attack")
    for name, family in families.items():
        attack = family.get("attack") if isinstance(family, Mapping) else None
        if attack not in attacks or attack == "none":
            raise BdrunError(
                f"population.families.{name}.attack={attack!r} is not a backdoor attack; "
                f"choose one of: {', '.join(sorted(attacks - {'none'}))}"
            )
        for key, spec in (family.get("draw") or {}).items():
            _check_spec(spec, f"population.families.{name}.draw.{key}")
    inspectors = node.get("inspectors")
    defenses = _options("defense")
    if not isinstance(inspectors, Sequence) or isinstance(inspectors, str) or not inspectors:
        raise BdrunError("population.inspectors must list model inspectors, e.g. [neural_cleanse]")
    for name in inspectors:
        if name not in defenses:
            raise BdrunError(
                f"population.inspectors: unknown defense {name!r}; choose from: "
                f"{', '.join(sorted(defenses))}"
            )


def _check_spec(spec: Any, key: str) -> None:
    if isinstance(spec, Sequence) and not isinstance(spec, str):
        if not spec:
            raise BdrunError(f"{key} is an empty list; give at least one value")
        return
    if isinstance(spec, Mapping) and set(spec) == {"low", "high"}:
        low, high = spec["low"], spec["high"]
        if not all(isinstance(v, int | float) and not isinstance(v, bool) for v in (low, high)):
            raise BdrunError(f"{key}: low and high must be numbers, got {low!r} and {high!r}")
        if low > high:
            raise BdrunError(f"{key}: low={low} is above high={high}")
        return
    raise BdrunError(f"{key}={spec!r} must be a list of choices or {{low: .., high: ..}}")


def draw_value(spec: Any, g: torch.Generator) -> Any:
    """One value of a draw spec: a list is a uniform choice; {low, high} a uniform number
    (an integer with both ends included when both are integers; else rounded to 4 decimals)."""
    if isinstance(spec, Mapping):
        low, high = spec["low"], spec["high"]
        if isinstance(low, int) and isinstance(high, int):
            return int(torch.randint(low, high + 1, (), generator=g))
        value = low + (high - low) * float(torch.rand((), generator=g, dtype=torch.float64))
        return round(value, 4)
    return spec[int(torch.randint(len(spec), (), generator=g))]


def plan(node: Mapping[str, Any]) -> list[Member]:
    """Every member of the population, deterministically from its seed (module docstring)."""
    node = _plain(node)
    check_population(node)
    seed, clean, backdoored = node["seed"], node["clean"], node["backdoored"]
    size = clean + backdoored
    labels = torch.randperm(size, generator=generator(seed, "population-labels"))
    is_backdoored = torch.zeros(size, dtype=torch.bool)
    is_backdoored[labels[:backdoored]] = True
    ids = torch.randperm(size, generator=generator(seed, "population-ids"))
    width = max(4, len(str(size - 1)))
    families = sorted(active_families(node))
    # families cycle over the backdoored members in a drawn order: counts differ by one at most
    order = torch.randperm(len(families), generator=generator(seed, "population-families"))
    family_of = {
        int(i): families[int(order[k % len(families)])] for k, i in enumerate(labels[:backdoored])
    }
    members = []
    for i in range(size):
        member_seed = derive_seed(seed, f"population-seed-{i}") % 2**31
        model_id = f"id-{int(ids[i]):0{width}d}"
        if not bool(is_backdoored[i]):
            members.append(Member(i, model_id, False, "clean", "none", {}, member_seed))
            continue
        family = family_of[i]
        spec = active_families(node)[family]
        g = generator(seed, f"population-draw-{i}")
        values = {key: draw_value(s, g) for key, s in sorted((spec.get("draw") or {}).items())}
        members.append(Member(i, model_id, True, family, spec["attack"], values, member_seed))
    return members


def _plain(node: Any) -> Any:
    if isinstance(node, DictConfig):
        return OmegaConf.to_container(node, resolve=True)
    return node


def is_member(cfg: DictConfig) -> bool:
    """Whether `cfg` is one job of a population (`population=<name> population.member=i`)."""
    node = cfg.get(KEY)
    return node is not None and node.get("member") is not None


def member_of(cfg: DictConfig) -> Member:
    """The member the config's `population.member` names, or a one-line error."""
    members = plan(cfg[KEY])
    index = cfg[KEY].member
    if isinstance(index, bool) or not isinstance(index, int) or not 0 <= index < len(members):
        raise BdrunError(
            f"population.member={index!r} must be an integer in [0, {len(members)}) "
            f"(population.clean + population.backdoored)"
        )
    return members[index]


def apply_member(cfg: DictConfig, choices: Mapping[str, Any], overrides: Sequence[str]) -> Member:
    """Make `cfg` (a composed population job) the member's run, in place, and apply the tuning
    files as for `bdrun attack=<member's attack>`: the drawn settings rank with the command line
    above the tuning files. The attack and the seed belong to the population: overriding them
    on the command line is an error."""
    for override in overrides:
        key = override.split("=", 1)[0].lstrip("+~")
        if key in ("attack", "seed") or key.startswith("attack."):
            raise BdrunError(
                f"{override!r}: a population draws every member's attack and seed; set "
                "population.families (or population.seed) instead"
            )
    member = member_of(cfg)
    inspector = str(choices.get("defense"))
    settings = (cfg[KEY].get("inspector_settings") or {}).get(inspector) or {}
    with open_dict(cfg):
        attack = component_config("attack", member.attack)
        for key, value in member.values.items():
            if key not in attack:
                raise BdrunError(
                    f"population.families.{member.family}.draw.{key}: attack {member.attack} "
                    f"has no setting {key!r}"
                )
            attack[key] = value
        cfg.attack = attack
        cfg.seed = member.seed
        cfg.export = False  # the population writes the member's weights itself
        for key, value in _plain(settings).items():
            if key not in cfg.defense:
                raise BdrunError(
                    f"population.inspector_settings.{inspector}.{key}: defense {inspector} has "
                    f"no setting {key!r}"
                )
            cfg.defense[key] = value
        cfg[KEY].assigned = {
            "model_id": member.model_id,
            "backdoored": member.backdoored,
            "family": member.family,
            "target": member.target,
        }
    drawn = [f"attack.{key}={value}" for key, value in member.values.items()]
    drawn += [f"defense.{key}=population" for key in settings]  # keys only: tuning keeps off
    apply_tuning(cfg, {**choices, "attack": member.attack}, [*overrides, *drawn])
    if member.backdoored and cfg.attack.get("label_mode", "all2one") == "all2one":
        with open_dict(cfg):  # the target the run trains with: drawn, or from a tuning file
            cfg[KEY].assigned.target = cfg.attack.get("target")
    return member


def model_path(root: Path, member: Member) -> Path:
    return Path(root) / MODELS_DIR / f"{member.model_id}.safetensors"


def weights_only(model: nn.Module) -> dict[str, torch.Tensor]:
    """The tensors a population file holds: the plain state dict (pruning masks folded in)
    without step counters, contiguous, on the CPU, in sorted key order."""
    from bdrun.export import plain_state

    state = plain_state(model)
    return {
        key: state[key] for key in sorted(state) if key.rsplit(".", 1)[-1] not in DROPPED_BUFFERS
    }


def save_member_model(model: nn.Module, root: Path, member: Member, options: Any) -> Path:
    """Write the member's weights (once; an existing file is kept) and the population's
    architecture description (`architecture.json`, the same for every member)."""
    from safetensors.torch import save_file

    from bdrun.export import model_config

    path = model_path(root, member)
    path.parent.mkdir(parents=True, exist_ok=True)
    architecture = path.parent / ARCHITECTURE_FILE
    if not architecture.is_file():
        config = model_config(model, {k: v for k, v in _plain(options).items()})
        with atomic_file(architecture) as tmp:
            tmp.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    if not path.is_file():
        with atomic_file(path) as tmp:
            save_file(weights_only(model), str(tmp))
    return path


def finished(run_dir: Path, cfg: DictConfig, root: Path, member: Member) -> dict[str, Any] | None:
    """The results of this job from an earlier run of the population (same config, weights
    file present), else None: a rerun inspects only what is missing."""
    path = Path(run_dir) / RESULTS_FILE
    if not path.is_file() or not model_path(root, member).is_file():
        return None
    try:
        results = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    current = json.loads(json.dumps(OmegaConf.to_container(cfg, resolve=True), default=str))
    earlier = results.get("config")
    if not isinstance(earlier, dict):
        return None
    return results if _job_config(earlier) == _job_config(current) else None


# population keys that do not change what one job computes: the inspector list (the job's own
# inspector is its `defense` node), the inspectors' settings (applied to that node) and the
# scoring's bootstrap. Adding an inspector, or scoring with more resamples, reruns nothing else.
SCORING_ONLY = ("inspectors", "inspector_settings", "bootstrap")


def _job_config(config: dict[str, Any]) -> dict[str, Any]:
    """A job's config without the population keys that do not change its results."""
    node = config.get(KEY)
    if not isinstance(node, dict):
        return config
    return {**config, KEY: {k: v for k, v in node.items() if k not in SCORING_ONLY}}


def member_count(node: Mapping[str, Any]) -> int:
    node = _plain(node)
    check_population(node)
    return int(node["clean"]) + int(node["backdoored"])


__all__ = ["Member", "apply_member", "is_member", "plan", "save_member_model"]
