"""Sweeps (Hydra multirun): a summary at the end, failed jobs named in one clear error, the
poisoned model trained once however many jobs need it, also when jobs run in parallel, and a
killed job leaves nothing broken behind."""

from __future__ import annotations

import csv
import json
import os
import signal
from datetime import datetime
from pathlib import Path

import pytest
from safetensors.torch import load_file

from conftest import run_bdrun, start_until_a_checkpoint


def sweep_dir(cwd: Path) -> Path:
    [folder] = [p.parent for p in (cwd / "outputs" / "multirun").rglob("multirun.yaml")]
    return folder


def job_results(folder: Path) -> dict[int, dict]:
    return {int(p.parent.name): json.loads(p.read_text()) for p in folder.glob("*/results.json")}


def cache_entries(cache: Path) -> list[Path]:
    models = cache / "models"
    return (
        sorted(p for p in models.iterdir() if not p.name.startswith(".")) if models.exists() else []
    )


def test_a_sweep_with_failing_jobs_writes_its_summary_and_ends_in_one_clear_error(tmp_path):
    cache = tmp_path / "cache"
    result = run_bdrun(
        "-m",
        "dataset=fake",
        "debug=smoke",
        "logger=none",
        "attack.poison_rate=0.1,2.0",
        "dataset.max_test=64,128",
        cwd=tmp_path,
        env={"BDRUN_CACHE": str(cache)},
    )
    assert result.returncode == 1
    assert "Traceback" not in result.stderr
    lines = [ln for ln in result.stderr.splitlines() if ln.strip()]
    assert lines[-3].startswith("bdrun: error: 2 of 4 sweep jobs failed")
    assert lines[-2].strip() == (
        "job 2 (dataset=fake debug=smoke logger=none attack.poison_rate=2.0 "
        "dataset.max_test=64): attack.poison_rate=2.0 must be in (0, 1]"
    )
    assert (
        lines[-1]
        .strip()
        .endswith(
            "attack.poison_rate=2.0 dataset.max_test=128): attack.poison_rate=2.0 must be in (0, 1]"
        )
    )

    folder = sweep_dir(tmp_path)
    results = job_results(folder)
    assert sorted(results) == [0, 1]
    # the test-set cap is downstream of training: the second job reuses the first one's model
    assert [results[i]["cache"]["model"] for i in (0, 1)] == ["miss", "hit"]
    assert len(cache_entries(cache)) == 1
    error = json.loads((folder / "2" / "error.json").read_text())
    assert error["error"] == "attack.poison_rate=2.0 must be in (0, 1]"
    assert sorted(p.name for p in (folder / "2").iterdir()) == [".hydra", "bdrun.log", "error.json"]

    with open(folder / "summary.csv") as f:
        rows = {int(r["job"]): r for r in csv.DictReader(f)}
    assert [rows[i]["status"] for i in range(4)] == ["done", "done", "failed", "failed"]
    for i in (0, 1):
        for stage in ("before", "after"):
            for metric in ("cca", "asr", "ra"):
                value = results[i]["metrics"][stage][metric]
                assert float(rows[i][f"{stage}_{metric}"]) == pytest.approx(value)
    assert rows[2]["error"] == "attack.poison_rate=2.0 must be in (0, 1]"
    figures = {p.name for p in (folder / "figures").iterdir()}
    assert "heatmap_asr_attack.poison_rate_x_dataset.max_test.png" in figures
    assert "## Failed jobs" in (folder / "summary.md").read_text()


@pytest.mark.slow
def test_a_sweep_that_succeeds_exits_zero(tmp_path):
    result = run_bdrun("-m", "dataset=fake", "debug=smoke", "logger=none", "seed=0,1", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    folder = sweep_dir(tmp_path)
    assert "## Mean ± std over seeds" in (folder / "summary.md").read_text()
    assert "2 of 2 jobs done" in result.stdout


def log_time(line: str) -> float:
    return datetime.strptime(line[1:24], "%Y-%m-%d %H:%M:%S,%f").timestamp()


@pytest.mark.slow
def test_parallel_jobs_train_the_shared_model_once(tmp_path):
    """Four jobs, two at a time (joblib), all needing the same poisoned model."""
    cache = tmp_path / "cache"
    result = run_bdrun(
        "-m",
        "hydra/launcher=local",
        "dataset.max_test=100,200,300,400",
        "train.epochs=8",
        "trainer.num_threads=1",
        "logger=none",
        cwd=tmp_path,
        env={"BDRUN_CACHE": str(cache), "BDRUN_LOCAL_JOBS": "2"},
        timeout=900,
    )
    assert result.returncode == 0, result.stderr
    folder = sweep_dir(tmp_path)
    results = job_results(folder)
    statuses = sorted(r["cache"]["model"] for r in results.values())
    assert statuses == ["hit", "hit", "hit", "miss"]
    assert len(cache_entries(cache)) == 1
    [trainer] = [i for i, r in results.items() if r["cache"]["model"] == "miss"]
    stored = next(
        log_time(ln)
        for ln in (folder / str(trainer) / "bdrun.log").read_text().splitlines()
        if "model cache stored" in ln
    )
    # some job started (Hydra saved its config) while the model was still being trained, and
    # still did not train it: it waited on the cache lock
    started = [(folder / str(i) / ".hydra" / "config.yaml").stat().st_mtime for i in results]
    assert any(t < stored for i, t in zip(results, started, strict=True) if i != trainer)
    before = {json.dumps(r["metrics"]["before"], sort_keys=True) for r in results.values()}
    assert len({r["metrics"]["before"]["asr"] for r in results.values()}) >= 1 and before


def lock_holder(lock: Path) -> int | None:
    """PID holding a flock on `lock`, from /proc/locks."""
    inode = os.stat(lock).st_ino
    for line in Path("/proc/locks").read_text().splitlines():
        parts = line.split()
        if len(parts) > 5 and parts[1] == "FLOCK" and int(parts[5].split(":")[2]) == inode:
            return int(parts[4])
    return None


@pytest.mark.slow
def test_a_killed_sweep_job_leaves_no_broken_entry_and_the_rerun_resumes(tmp_path):
    cache = tmp_path / "cache"
    args = (
        "-m",
        "hydra/launcher=local",
        "dataset.max_test=100,200",
        "train.epochs=40",
        "trainer.num_threads=1",
        "logger=none",
    )
    env = {**os.environ, "BDRUN_CACHE": str(cache), "BDRUN_LOCAL_JOBS": "2"}
    proc, checkpoints = start_until_a_checkpoint(args, tmp_path, env)
    [lock] = (cache / "models").glob(".*.lock")
    holder = lock_holder(lock)
    assert holder is not None and holder != proc.pid  # a worker process trains
    os.kill(holder, signal.SIGKILL)
    _, err = proc.communicate(timeout=600)
    assert proc.returncode == 1
    assert "Traceback" not in err
    assert "bdrun: error:" in err and "did not finish" in err
    assert cache_entries(cache) == []  # nothing half-written
    assert list(checkpoints.glob("*/last.ckpt"))  # what the killed job had trained so far

    again = run_bdrun(*args, cwd=tmp_path, env=env, timeout=900)  # the same sweep again
    assert again.returncode == 0, again.stderr
    [rerun] = [p for p in (tmp_path / "outputs" / "multirun").rglob("summary.csv")
               if len(list(p.parent.glob("*/results.json"))) == 2]  # fmt: skip
    statuses = sorted(r["cache"]["model"] for r in job_results(rerun.parent).values())
    assert statuses == ["hit", "miss"]
    [entry] = cache_entries(cache)
    assert load_file(entry / "model.safetensors")  # complete, loadable
    assert not list(checkpoints.glob("*/last.ckpt"))
    resumed = [p for p in (tmp_path / "outputs").rglob("bdrun.log") if "resuming" in p.read_text()]
    assert resumed


def test_an_unknown_launcher_is_one_line(tmp_path):
    result = run_bdrun("-m", "hydra/launcher=slrm", "debug=smoke", cwd=tmp_path)
    assert result.returncode == 2
    assert result.stderr.strip() == (
        "bdrun: error: unknown hydra/launcher 'slrm'; choose one of: basic, joblib, local, "
        "slurm, submitit_local, submitit_slurm"
    )
    assert not (tmp_path / "outputs").exists()


@pytest.mark.slow
def test_sigterm_stops_the_whole_sweep_and_summarises_what_finished(tmp_path):
    cache = tmp_path / "cache"
    env = {**os.environ, "BDRUN_CACHE": str(cache)}
    args = ("-m", "seed=0,1", "train.epochs=400", "logger=none")
    proc, _ = start_until_a_checkpoint(args, tmp_path, env)
    proc.send_signal(signal.SIGTERM)  # to the driver: the basic launcher runs jobs in-process
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 143, err
    assert "Traceback" not in err
    assert "bdrun: error: sweep stopped by SIGTERM" in err
    assert "#0 : seed=0" in out and "#1 : " not in out  # the second job never started
    folder = sweep_dir(tmp_path)
    assert (folder / "summary.md").is_file() and json.loads(
        (folder / "0" / "error.json").read_text()
    )
