"""Tuning files (conf/tuning/, bdrun.tuning): applied below debug, experiment and the command
line, to every defense of a stack, recorded in the config, results.json and the summary, and
switched off by one override."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from bdrun.config import component_values
from bdrun.tuning import CONF_DIR, TUNING_DIR

from conftest import compose_config, run_bdrun


def changed_by(cfg, file: str) -> list[str]:
    return next((e["changed"] for e in cfg.tuning.applied if e["file"] == file), [])


def test_a_tuning_file_changes_its_component_and_says_which_keys():
    cfg = compose_config("attack=sig")
    assert (cfg.attack.signal, cfg.attack.target, cfg.attack.delta) == ("ramp", 9, 255)
    entry = next(e for e in cfg.tuning.applied if e["file"].endswith("sig_digits.yaml"))
    assert entry["file"] == "tuning/attack_dataset/sig_digits.yaml"
    assert set(entry["changed"]) == {
        "attack.signal",
        "attack.target",
        "attack.poison_rate",
        "attack.delta",
    }
    assert entry["values"]["attack.target"] == {"default": 0, "tuned": 9}


def test_the_command_line_beats_a_tuning_file_and_the_key_is_not_listed():
    cfg = compose_config("attack=sig", "attack.target=4")
    assert cfg.attack.target == 4 and cfg.attack.signal == "ramp"
    assert "attack.target" not in changed_by(cfg, "tuning/attack_dataset/sig_digits.yaml")


def test_debug_and_experiment_beat_a_tuning_file():
    smoke = compose_config("dataset=fashion_mnist", "debug=smoke")
    assert smoke.train.epochs == 1 and smoke.train.batch_size == 128
    assert changed_by(smoke, "tuning/dataset/fashion_mnist.yaml") == ["train.batch_size"]
    bench = compose_config("experiment=backdoorbench_cifar10")
    assert bench.train.epochs == 100 and bench.train.lr == 0.01  # tuning/dataset/cifar10: 40, 0.05
    assert changed_by(bench, "tuning/dataset/cifar10.yaml") == []


def test_each_stacked_defense_gets_its_own_tuning_file():
    cfg = compose_config("defense=[nad,abl]")
    assert cfg.defense.crop_padding == 1  # nad_digits.yaml
    assert cfg.defense_stack.abl.unlearning_anchor == "holdout"  # abl_digits.yaml
    assert "defense_stack.abl.unlearning_anchor" in changed_by(
        cfg, "tuning/defense_dataset/abl_digits.yaml"
    )
    alone = compose_config("defense=abl")
    assert alone.defense.unlearning_anchor == "holdout"


def test_one_override_turns_tuning_off():
    plain = compose_config("attack=sig", "defense=[nad,abl]", "tuning.enabled=false")
    group = OmegaConf.load(CONF_DIR / "attack" / "sig.yaml")
    assert plain.attack.target == group.target and plain.attack.signal == group.signal
    assert plain.defense_stack.abl.unlearning_anchor == "none"
    assert list(plain.tuning.applied) == []


@pytest.mark.parametrize(
    "path", sorted(TUNING_DIR.rglob("*.yaml")), ids=lambda p: str(p.relative_to(TUNING_DIR))
)
def test_every_tuning_file_sets_keys_its_component_has(path: Path):
    kind = path.parent.name
    if kind == "dataset":
        component = OmegaConf.load(CONF_DIR / "config.yaml").train
    else:
        group = kind.split("_")[0]  # attack_dataset -> attack, defense_dataset -> defense
        names = sorted(p.stem for p in (CONF_DIR / group).glob("*.yaml"))
        name = next(n for n in sorted(names, key=len, reverse=True) if path.stem.startswith(n))
        component = component_values(group, name)
    tuned = OmegaConf.load(path)
    unknown = sorted(set(tuned) - set(component))
    assert not unknown, f"{path.name} sets {unknown}, which its component does not have"
    assert not path.read_text().startswith("# @package"), "tuning files are not Hydra configs"


def test_the_run_records_its_tuning_in_results_and_summary(tmp_path):
    proc = run_bdrun("defense=nad", "debug=smoke", "logger=none", "hydra.run.dir=run", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "tuning: tuning/defense_dataset/nad_digits.yaml (defense.lr" in proc.stdout
    results = json.loads((tmp_path / "run" / "results.json").read_text())
    assert [e["file"] for e in results["tuning"]] == ["tuning/defense_dataset/nad_digits.yaml"]
    assert "defense.crop_padding" in results["tuning"][0]["changed"]


def test_cfg_job_shows_the_tuned_stack(tmp_path):
    proc = run_bdrun("defense=[nad,abl]", "--cfg", "job", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    printed = OmegaConf.create(proc.stdout)
    assert printed.defense_stack.abl.unlearning_anchor == "holdout"
    assert not list(tmp_path.iterdir())  # printing the config makes no run folder


def test_a_bad_tuning_switch_is_one_line(tmp_path):
    proc = run_bdrun("tuning.enabled=maybe", cwd=tmp_path)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        "bdrun: error: tuning.enabled='maybe' must be true or false"
    ]
