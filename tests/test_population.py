"""Model populations (bdrun.population, bdrun-population): deterministic draws, one-line errors,
weights-only model files, reruns that skip finished jobs, scoring and load_runs."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf
from safetensors import safe_open

from bdrun import population
from bdrun.errors import BdrunError
from bdrun.models.small_cnn import SmallCNN
from bdrun.report import load_runs
from bdrun.report.frame import flatten

from conftest import compose_config


def digits_node(**changes):
    node = OmegaConf.to_container(compose_config("population=digits").population, resolve=True)
    return {**node, **changes}


def test_the_plan_is_drawn_from_the_population_seed():
    node = digits_node()
    members = population.plan(node)
    assert members == population.plan(node)
    assert sum(m.backdoored for m in members) == 25 and len(members) == 50
    assert len({m.model_id for m in members}) == 50 and len({m.seed for m in members}) == 50
    counts = {f: sum(m.family == f for m in members) for f in node["families"]}
    assert max(counts.values()) - min(counts.values()) <= 1  # families cycle
    for m in members:
        if m.backdoored and "poison_rate" in m.values:
            spec = node["families"][m.family]["draw"]["poison_rate"]
            assert spec["low"] <= m.values["poison_rate"] <= spec["high"]
        if not m.backdoored:
            assert (m.attack, m.values, m.family) == ("none", {}, "clean")
    other = population.plan(digits_node(seed=1))
    assert [m.backdoored for m in other] != [m.backdoored for m in members]


def test_a_member_job_gets_its_attack_draws_seed_and_the_tuning_files():
    node = digits_node()
    sig = next(m for m in population.plan(node) if m.family == "sig")
    cfg = compose_config(
        "population=digits", f"population.member={sig.index}", "defense=neural_cleanse"
    )
    assert cfg.attack.name == "sig" and cfg.seed == sig.seed
    assert cfg.attack.frequency == sig.values["frequency"]
    assert cfg.attack.target == 9  # conf/tuning/attack_dataset/sig_digits.yaml
    assert cfg.population.assigned.target == 9  # the target scored is the one trained with
    assert cfg.defense.mitigation == "none"  # population.inspector_settings
    assert cfg.population.assigned.model_id == sig.model_id
    clean = next(m for m in population.plan(node) if not m.backdoored)
    cfg = compose_config("population=digits", f"population.member={clean.index}", "defense=abs")
    assert cfg.attack.name == "none" and cfg.population.assigned.backdoored is False


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["population.clean=0"], "population.clean=0 must be an integer >= 1"),
        (["population.member=50"], "population.member=50 must be an integer in [0, 50)"),
        (["population.member=1", "attack.target=3"], "draws every member's attack and seed"),
        (["population.inspectors=[nope]"], "unknown defense 'nope'"),
        (["+population.families.x.attack=nope"], "families.x.attack='nope'"),
        (["population.families.sig.draw.frequency=5"], "must be a list of choices"),
    ],
)
def test_population_mistakes_end_in_one_line(overrides, message):
    with pytest.raises(BdrunError, match=re.escape(message)):
        cfg = compose_config("population=digits", *overrides)
        population.plan(cfg.population)


def test_a_weights_file_drops_step_counters_and_holds_no_metadata(tmp_path):
    member = population.Member(0, "id-0000", False, "clean", "none", {}, 1)
    model = SmallCNN(
        in_shape=(1, 8, 8), num_classes=10, mean=[0.5], std=[0.5], width=4, hidden=8,
        dropout=0.0, batch_norm=True,
    )  # fmt: skip
    path = population.save_member_model(model, tmp_path, member, {"width": 4, "hidden": 8})
    with safe_open(path, "pt") as f:
        assert not f.metadata()
        keys = set(f.keys())
    assert not any(k.endswith("num_batches_tracked") for k in keys)
    assert keys == {k for k in model.state_dict() if not k.endswith("num_batches_tracked")}
    architecture = json.loads((tmp_path / "models" / population.ARCHITECTURE_FILE).read_text())
    assert architecture["_target_"].endswith("SmallCNN") and architecture["width"] == 4


def bdrun_population(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "bdrun.population_cli", *args],
        cwd=cwd, capture_output=True, text=True, timeout=600, env=dict(os.environ),
    )  # fmt: skip


def header(path: Path) -> bytes:
    """The safetensors header: every tensor's name, dtype, shape and offsets."""
    data = path.read_bytes()
    return data[8 : 8 + int.from_bytes(data[:8], "little")]


def test_a_small_population_is_built_scored_and_rerun_without_work(tmp_path):
    """1 clean + 1 backdoored smoke-sized model, MM-BD on both, through bdrun-population."""
    folder = tmp_path / "pop"
    args = (
        "digits", "population.clean=1", "population.backdoored=1", "population.inspectors=[mm_bd]",
        "population.bootstrap=20", "debug=smoke", "logger=none", f"hydra.sweep.dir={folder}",
    )  # fmt: skip
    done = bdrun_population(*args, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-2000:]
    # nothing but the weights tells the two models apart
    files = sorted((folder / "models").glob("*.safetensors"))
    assert len(files) == 2
    assert header(files[0]) == header(files[1])
    assert files[0].stat().st_size == files[1].stat().st_size
    with safe_open(files[0], "pt") as a, safe_open(files[1], "pt") as b:
        assert a.metadata() == b.metadata() is None
        names = list(a.keys())
        assert names == list(b.keys())
        assert any(not torch.equal(a.get_tensor(k), b.get_tensor(k)) for k in names)
    truth = (folder / "ground_truth.csv").read_text().splitlines()
    assert truth[0] == "model_id,backdoored,family,target" and len(truth) == 3
    scores = json.loads((folder / "population.json").read_text())
    assert {(r["inspector"], r["family"]) for r in scores["scores"]} >= {("mm_bd", "all")}
    assert len(scores["calibration_models"]) == 2
    assert (folder / "population_roc.png").stat().st_size > 0
    assert "| mm_bd | all | 1 | 1 |" in (folder / "population.md").read_text()
    # a rerun inspects nothing again
    again = bdrun_population(*args, cwd=tmp_path)
    assert again.returncode == 0, again.stderr[-2000:]
    assert again.stdout.count("finished in an earlier run, not run again") == 2
    # an inspector added (and the scoring's resamples changed) runs the new inspector only
    more = [a for a in args if not a.startswith(("population.inspectors", "population.bootstrap"))]
    more += ["population.inspectors=[mm_bd,neuron_inspect]", "population.bootstrap=30"]
    added = bdrun_population(*more, cwd=tmp_path)
    assert added.returncode == 0, added.stderr[-2000:]
    assert added.stdout.count("finished in an earlier run, not run again") == 2
    assert "| neuron_inspect | all | 1 | 1 |" in (folder / "population.md").read_text()
    # the notebook table: one row per run, metrics flattened
    frame = load_runs(folder)
    assert len(frame) == 4 and set(frame["status"]) == {"done"}
    assert frame["metrics.detection.score"].notna().all()
    assert set(frame["config.population.assigned.backdoored"]) == {True, False}


def test_bdrun_population_refuses_what_it_sets_itself(tmp_path):
    result = bdrun_population("digits", "defense=abs", cwd=tmp_path)
    assert result.returncode == 2
    assert (
        result.stderr.strip().splitlines() == [result.stderr.strip().splitlines()[-1]]
        and "bdrun-population sets the population" in result.stderr
    )
    result = bdrun_population("--score", str(tmp_path), cwd=tmp_path)
    assert result.returncode == 2 and "no finished population runs" in result.stderr


def test_load_runs_flattens_results_and_lists_failures(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "results.json").write_text(
        json.dumps({"attack": "badnets", "metrics": {"before": {"asr": 0.9}}, "seed": 1})
    )
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "error.json").write_text(json.dumps({"error": "boom", "overrides": ["x=1"]}))
    frame = load_runs(tmp_path)
    assert list(frame["status"]) == ["done", "failed"]
    assert frame.loc[0, "metrics.before.asr"] == 0.9 and frame.loc[1, "error"] == "boom"
    assert frame.loc[1, "overrides"] == "x=1"
    assert flatten({"a": {"b": [1, 2], "c": {}}}) == {"a.b": [1, 2], "a.c": {}}
    assert list(load_runs(tmp_path / "a").columns)[:4] == ["folder", "status", "error", "overrides"]
    with pytest.raises(BdrunError, match="is not a folder of runs"):
        load_runs(tmp_path / "missing")
