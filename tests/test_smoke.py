"""Attack x defense configs compose and run end to end on a tiny slice (debug=smoke).

The fast suite smokes every component once (each attack against no defense, each defense
against BadNets) and a seeded sample of other pairs (BDRUN_SMOKE_SEED picks another sample;
the default keeps CI repeatable); the full grid runs under the `slow` marker. A new attack or
defense therefore adds one fast end-to-end run, not one per component of the other group.
"""

from __future__ import annotations

import json
import os
import random

import pytest

from bdrun.runner import run

from conftest import attack_overrides, compose_config, conf_options, defense_model, run_bdrun

ATTACKS, DEFENSES = conf_options("attack"), conf_options("defense")
ONCE = [(attack, "none") for attack in ATTACKS] + [
    ("badnets", defense) for defense in DEFENSES if defense != "none"
]
OTHERS = [(a, d) for a in ATTACKS for d in DEFENSES if (a, d) not in ONCE]
SAMPLE_SIZE = 8
SAMPLED = random.Random(int(os.environ.get("BDRUN_SMOKE_SEED", "0"))).sample(
    OTHERS, min(SAMPLE_SIZE, len(OTHERS))
)
REST = [pair for pair in OTHERS if pair not in SAMPLED]


def smoke_run(attack: str, defense: str, tmp_path) -> None:
    model = defense_model(defense)
    extra = attack_overrides(attack, tmp_path, "debug=smoke", *model)
    cfg = compose_config(
        f"attack={attack}", f"defense={defense}", "debug=smoke", "logger=none", *model, *extra
    )
    run(cfg, tmp_path)
    written = json.loads((tmp_path / "results.json").read_text())
    assert written["attack"] == cfg.attack.name and written["defense"] == cfg.defense.name
    for stage in ("before", "after"):
        for key in ("cca", "asr", "ra"):
            value = written["metrics"][stage][key]  # an undefined figure (NaN) is written null
            assert value is None or 0 <= value <= 1


@pytest.mark.parametrize("attack, defense", ONCE + SAMPLED)
def test_components_and_sampled_pairs_run_in_smoke_mode(attack, defense, tmp_path):
    smoke_run(attack, defense, tmp_path)


@pytest.mark.slow
@pytest.mark.parametrize("attack, defense", REST)
def test_the_rest_of_the_attack_defense_grid_runs_in_smoke_mode(attack, defense, tmp_path):
    smoke_run(attack, defense, tmp_path)


def test_the_showcase_runs_as_a_smoke_run(tmp_path):
    """`bdrun attack=sig defense=abl debug=smoke`: the smoke slice keeps the nines' share, so the
    tuned SIG poisons its 9 % of the slice, and both tuning files apply."""
    args = ("attack=sig", "defense=abl", "debug=smoke", "logger=none", "hydra.run.dir=run")
    proc = run_bdrun(*args, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    results = json.loads((tmp_path / "run" / "results.json").read_text())
    poison = results["poison"]
    assert poison["train_size"] == 256
    assert poison["train_poisoned"] == round(0.09 * 256)
    assert [entry["file"] for entry in results["tuning"]] == [
        "tuning/attack_dataset/sig_digits.yaml",
        "tuning/defense_dataset/abl_digits.yaml",
    ]
