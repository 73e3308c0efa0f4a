"""Sweep-scale figures: model cache reuse in a 12-job sweep, the same sweep on Slurm, DDP.

Each measurement runs the real `bdrun` command in subprocesses with a fresh model cache and
prints its figures. Run them one at a time on a quiet machine:

    python benchmarks/sweep_figures.py cache  [--sweep OVERRIDE ...] [--base OVERRIDE ...]
    python benchmarks/sweep_figures.py slurm  [--sweep ...] [--base ...]   # needs a cluster
    python benchmarks/sweep_figures.py ddp    [--base ...]

cache: wall of one uncached single run (the sweep's first job), then of the whole sweep
       (sequential, Hydra's basic launcher); prints model cache misses over the sweep (1 when
       the swept parameters are all downstream of training) and sweep wall / (N x single).
slurm: the sweep through hydra/launcher=slurm: jobs done, summary written, time from the
       command's start to the first results.json, total wall.
ddp:   one training with trainer=cpu and with trainer=ddp (2 CPU processes): CCA / ASR of both
       and the wall ratio.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

# a 10k-image slice of Fashion-MNIST, 3 epochs: the poisoned model every job of the sweep needs
BASE = [
    "dataset=fashion_mnist",
    "dataset.max_train=10000",
    "train.epochs=3",
    "trainer.num_threads=1",
    "logger=none",
]
SWEEP = ["defense=fine_pruning", "defense.lr=1e-2,1e-3,1e-4", "defense.prune_ratio=0.1,0.3,0.5,0.7"]


def bdrun(args: list[str], cwd: Path, env: dict[str, str], timeout: int = 7200) -> float:
    """Run bdrun; its wall time in seconds (raises with its stderr when it fails)."""
    started = time.perf_counter()
    result = subprocess.run(
        [sys.executable, "-m", "bdrun.cli", *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    wall = time.perf_counter() - started
    if result.returncode != 0:
        raise SystemExit(f"bdrun {' '.join(args)} failed:\n{result.stderr[-3000:]}")
    return wall


def first_job(sweep: list[str]) -> list[str]:
    """The sweep's first job as single-run overrides (first value of every swept key)."""
    return [f"{o.split('=', 1)[0]}={o.split('=', 1)[1].split(',')[0]}" for o in sweep]


def job_count(sweep: list[str]) -> int:
    return math.prod(len(o.split("=", 1)[1].split(",")) for o in sweep)


def sweep_folder(cwd: Path) -> Path:
    [folder] = [p.parent for p in (cwd / "outputs" / "multirun").rglob("multirun.yaml")]
    return folder


def fresh_env(work: Path, **extra: str) -> dict[str, str]:
    return {**os.environ, "BDRUN_CACHE": str(work / "cache"), "CI": "true", **extra}


def summary_rows(folder: Path) -> list[dict[str, str]]:
    with open(folder / "summary.csv") as f:
        return list(csv.DictReader(f))


def measure_cache(base: list[str], sweep: list[str]) -> None:
    n = job_count(sweep)
    with tempfile.TemporaryDirectory(prefix="bdrun-bench-") as tmp:
        single_dir = Path(tmp) / "single"
        single_dir.mkdir()
        single = bdrun([*base, *first_job(sweep)], single_dir, fresh_env(single_dir))
        sweep_dir = Path(tmp) / "sweep"
        sweep_dir.mkdir()
        total = bdrun(["-m", *base, *sweep], sweep_dir, fresh_env(sweep_dir))
        folder = sweep_folder(sweep_dir)
        rows = summary_rows(folder)
        jobs = [json.loads(p.read_text()) for p in folder.glob("*/results.json")]
    misses = sum(r["cache"] == "miss" for r in rows)
    curves = [j["metrics"].get("detection", {}).get("curve_cache") for j in jobs]
    print(f"sweep: {' '.join(sweep)}  (base: {' '.join(base)})")
    print(f"jobs: {len(rows)} of {n} done, model cache misses: {misses}")
    if any(curves):
        print(f"pruning curves scored: {curves.count('miss')}, reused: {curves.count('hit')}")
    print(f"single uncached run: {single:.1f} s wall")
    print(
        f"sweep: {total:.1f} s wall; {n} x single = {n * single:.1f} s; ratio {total / (n * single):.3f}"
    )


def measure_slurm(base: list[str], sweep: list[str]) -> None:
    n = job_count(sweep)
    with tempfile.TemporaryDirectory(prefix="bdrun-bench-", dir=os.getcwd()) as tmp:
        work = Path(tmp)
        env = fresh_env(work, BDRUN_SLURM_CPUS=os.environ.get("BDRUN_SLURM_CPUS", "1"))
        started = time.perf_counter()
        proc = subprocess.Popen(
            [sys.executable, "-m", "bdrun.cli", "-m", "hydra/launcher=slurm", *base, *sweep],
            cwd=work,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        first = None
        while proc.poll() is None:
            if first is None and list((work / "outputs").rglob("results.json")):
                first = time.perf_counter() - started
            time.sleep(0.2)
        total = time.perf_counter() - started
        _, err = proc.communicate()
        if proc.returncode != 0:
            raise SystemExit(f"slurm sweep failed:\n{err[-3000:]}")
        folder = sweep_folder(work)
        rows = summary_rows(folder)
        summary = (folder / "summary.md").is_file()
    misses = sum(r["cache"] == "miss" for r in rows)
    done = sum(r["status"] == "done" for r in rows)
    print(f"slurm sweep: {' '.join(sweep)}  (base: {' '.join(base)})")
    print(f"jobs done: {done} of {n}; model cache misses: {misses}; summary.md written: {summary}")
    print(f"time to first result: {first:.1f} s; total wall: {total:.1f} s")


def measure_ddp(base: list[str]) -> None:
    figures = {}
    for name, trainer in (("1 process", ["trainer=cpu"]), ("DDP 2 processes", ["trainer=ddp"])):
        with tempfile.TemporaryDirectory(prefix="bdrun-bench-") as tmp:
            work = Path(tmp)
            args = [*base, *trainer, "trainer.num_threads=1", "cache=false"]
            wall = bdrun(args, work, fresh_env(work))
            [path] = (work / "outputs").rglob("results.json")
            results = json.loads(path.read_text())
        before = results["metrics"]["before"]
        figures[name] = (wall, results["timing"]["train_s"], before["cca"], before["asr"])
        print(
            f"{name}: wall {wall:.1f} s, train {figures[name][1]:.1f} s, "
            f"CCA {100 * before['cca']:.2f} %, ASR {100 * before['asr']:.2f} %"
        )
    (w1, t1, c1, a1), (w2, t2, c2, a2) = figures.values()
    print(
        f"DDP / 1 process: wall ratio {w2 / w1:.2f}, train ratio {t2 / t1:.2f}; "
        f"ΔCCA {100 * (c2 - c1):+.2f} points, ΔASR {100 * (a2 - a1):+.2f} points"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("what", choices=("cache", "slurm", "ddp"))
    parser.add_argument("--base", nargs="*", default=BASE, help="overrides of every run")
    parser.add_argument("--sweep", nargs="*", default=SWEEP, help="swept overrides")
    args = parser.parse_args()
    if args.what == "cache":
        measure_cache(args.base, args.sweep)
    elif args.what == "slurm":
        measure_slurm(args.base, args.sweep)
    else:
        measure_ddp(args.base)


if __name__ == "__main__":
    main()
