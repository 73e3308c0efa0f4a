"""hydra/launcher=slurm against a real one-node Slurm cluster on this machine.

Start it first (root or sudo; Debian/Ubuntu):
    scripts/slurm/install.sh && scripts/slurm/start.sh
The tests skip when no cluster answers. They cover a sweep that completes (summary written,
the poisoned model trained once across Slurm jobs) and one with a failing job and a job
cancelled while it runs: the sweep must end with an error naming both, not hang.
"""

from __future__ import annotations

import csv
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

SLURM_ENV = {"BDRUN_SLURM_CPUS": "1", "BDRUN_SLURM_MEM_GB": "2", "BDRUN_SLURM_TIME_MIN": "20"}


def cluster_up() -> bool:
    if not (shutil.which("sbatch") and shutil.which("sinfo")):
        return False
    try:
        states = subprocess.run(
            ["sinfo", "-h", "-o", "%T"], capture_output=True, text=True, timeout=10
        )
    except (OSError, subprocess.SubprocessError):
        return False
    return states.returncode == 0 and any(
        s.strip().rstrip("*") in ("idle", "mixed", "allocated") for s in states.stdout.split()
    )


if not cluster_up():
    pytest.skip(
        "no Slurm cluster answers (scripts/slurm/install.sh && scripts/slurm/start.sh)",
        allow_module_level=True,
    )


def start_sweep(cwd: Path, cache: Path, *overrides: str) -> subprocess.Popen:
    env = {**os.environ, **SLURM_ENV, "BDRUN_CACHE": str(cache)}
    return subprocess.Popen(
        [sys.executable, "-m", "bdrun.cli", "-m", "hydra/launcher=slurm", *overrides],
        cwd=cwd,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def sweep_dir(cwd: Path) -> Path:
    [folder] = [p.parent for p in (cwd / "outputs" / "multirun").rglob("multirun.yaml")]
    return folder


def test_a_sweep_runs_as_slurm_jobs_and_writes_its_summary(tmp_path):
    proc = start_sweep(
        tmp_path,
        tmp_path / "cache",
        "dataset=fake",
        "debug=smoke",
        "logger=none",
        "dataset.max_test=64,128,192",
    )
    out, err = proc.communicate(timeout=900)
    assert proc.returncode == 0, err
    folder = sweep_dir(tmp_path)
    arrays = [p.name for p in (folder / ".submitit").iterdir() if re.fullmatch(r"\d+_\d+", p.name)]
    assert len(arrays) == 3  # one Slurm array task per job
    results = [json.loads(p.read_text()) for p in folder.glob("*/results.json")]
    assert sorted(r["cache"]["model"] for r in results) == ["hit", "hit", "miss"]
    with open(folder / "summary.csv") as f:
        assert [r["status"] for r in csv.DictReader(f)] == ["done"] * 3
    assert "3 of 3 jobs done" in out


def test_a_failing_and_a_cancelled_job_end_the_sweep_in_a_clear_error(tmp_path):
    # jobs: 0 (1 epoch) ok, 1 and 3 fail on the poison rate, 2 (5000 epochs, minutes) is cancelled
    proc = start_sweep(
        tmp_path,
        tmp_path / "cache",
        "dataset=fake",
        "debug=smoke",
        "logger=none",
        "train.epochs=1,5000",
        "attack.poison_rate=0.1,2.0",
    )
    deadline = time.monotonic() + 600
    cancelled = None
    while cancelled is None and time.monotonic() < deadline and proc.poll() is None:
        queue = subprocess.run(
            ["squeue", "-h", "-o", "%i %T %o"], capture_output=True, text=True
        ).stdout.splitlines()
        for line in queue:
            job_id, state = line.split()[:2]
            if job_id.endswith("_2") and state == "RUNNING" and str(tmp_path) in line:
                time.sleep(2)  # let it get into training
                subprocess.run(["scancel", job_id], check=True)
                cancelled = job_id
        time.sleep(1)
    assert cancelled, "job 2 never ran"
    _, err = proc.communicate(timeout=600)  # a hang fails here
    assert proc.returncode == 1
    assert "Traceback" not in err
    lines = [ln.strip() for ln in err.splitlines() if ln.strip()]
    assert lines[0].startswith("bdrun: error: 3 of 4 sweep jobs failed")
    assert any(
        ln.startswith("job 1 (") and ln.endswith("attack.poison_rate=2.0 must be in (0, 1]")
        for ln in lines
    )
    assert any(
        ln.startswith("job 2 (") and f"Slurm job {cancelled} ended CANCELLED" in ln for ln in lines
    )
    folder = sweep_dir(tmp_path)
    with open(folder / "summary.csv") as f:
        status = {int(r["job"]): r["status"] for r in csv.DictReader(f)}
    assert status == {0: "done", 1: "failed", 2: "missing", 3: "failed"}
