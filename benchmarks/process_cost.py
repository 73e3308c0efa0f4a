"""Whole-process cost of a bdrun run against an independent hand-written script.

Runs, alternating, `benchmarks/handwritten_fmnist.py` (plain PyTorch, shares nothing with bdrun
but the Fashion-MNIST files) and the same experiment through the CLI:

    bdrun dataset=fashion_mnist model=lenet train.epochs=2 train.batch_size=128 \\
          cache.enabled=false logger=none

Each side is a fresh process; the wall time is measured around it, the training phase is what
each reports over the same span: from building the model (the cache key, in bdrun) through the
optimizer (whose first construction imports torch._dynamo) to the end of the loop (bdrun:
results.json's `train_s`; the script: its `train_s`). Prints every run, then each side's
median and range and the ratios hand / bdrun (1.0 = as fast as the script; issue 19 asks >= 0.95
for the process and >= 0.9 for the training). `--default` measures the default digits run
(`bdrun cache.enabled=false logger=none`) alone. Give the machine's load (`uptime`) with the
figures: on 2 busy cores they move by seconds.

    .venv/bin/python benchmarks/process_cost.py [--repeats 3] [--default]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
BDRUN = [sys.executable, "-m", "bdrun.cli"]
FASHION = ["dataset=fashion_mnist", "model=lenet", "train.epochs=2", "train.batch_size=128"]
PLAIN = ["cache.enabled=false", "logger=none"]


def timed(command: list[str], env: dict[str, str]) -> tuple[float, str]:
    started = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True, env=env, check=False)
    wall = time.perf_counter() - started
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(command)} failed:\n{done.stderr[-2000:]}")
    return wall, done.stdout


def bdrun_run(args: list[str], env: dict[str, str]) -> dict[str, float]:
    with tempfile.TemporaryDirectory() as folder:
        wall, _ = timed([*BDRUN, *args, *PLAIN, f"hydra.run.dir={folder}"], env)
        results = json.loads((Path(folder) / "results.json").read_text())
    return {"wall": wall, "train": results["timing"]["train_s"]}


def script_run(env: dict[str, str]) -> dict[str, float]:
    wall, out = timed([sys.executable, str(HERE / "handwritten_fmnist.py")], env)
    return {"wall": wall, "train": json.loads(out.splitlines()[-1])["train_s"]}


def spread(values: list[float]) -> str:
    return f"{statistics.median(values):6.2f} s ({min(values):.2f} to {max(values):.2f})"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--default", action="store_true", help="the default digits run alone")
    args = parser.parse_args()
    env = {**os.environ, "CI": "true"}
    print(f"load before: {os.getloadavg()[0]:.2f}")
    if args.default:
        runs = [bdrun_run([], env) for _ in range(args.repeats)]
        for run in runs:
            print(f"bdrun default: wall {run['wall']:.2f} s, train {run['train']:.2f} s")
        print(f"wall  {spread([r['wall'] for r in runs])}")
        print(f"train {spread([r['train'] for r in runs])}")
        return
    sides: dict[str, list[dict[str, float]]] = {"script": [], "bdrun": []}
    for _ in range(args.repeats):
        sides["script"].append(script_run(env))
        sides["bdrun"].append(bdrun_run(FASHION, env))
        for name in sides:
            run = sides[name][-1]
            print(f"{name:6s}: wall {run['wall']:.2f} s, train {run['train']:.2f} s", flush=True)
    for name, runs in sides.items():
        print(f"{name:6s} wall {spread([r['wall'] for r in runs])}")
        print(f"{name:6s} train {spread([r['train'] for r in runs])}")
    for phase in ("wall", "train"):
        hand = statistics.median(r[phase] for r in sides["script"])
        ours = statistics.median(r[phase] for r in sides["bdrun"])
        print(f"{phase}: hand / bdrun = {hand / ours:.2f}")
    print(f"load after: {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
