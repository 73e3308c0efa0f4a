"""Where a bdrun process's time goes, phase by phase, in fresh processes.

Each repeat starts a fresh interpreter that times its own imports (torch, then bdrun's CLI with
Hydra), then runs `bdrun.cli.main` on the given overrides with timers wrapped around the
functions of each phase (wall time, cumulative, nested phases inside their parents):

- check_overrides: bdrun's own composition and checks before Hydra's;
- Hydra: the task less the run and the summary printout (Hydra's composition, job set-up);
- setup: the run's set-up (data, attack, model factory, logger), holding
  - load_splits: reading and splitting the dataset;
- content_key: hashing the training tensors for the model cache;
- fit: the training, holding the loop's set-up and its imports;
- evaluate: scoring on the test sets;
- write: results.json and the exported models;
- after the task: summary, logger, Hydra's teardown, up to the process's end.

Also the bare interpreter (`python -c pass`). Prints each phase's median and range.

    .venv/bin/python benchmarks/process_phases.py [--repeats 3] [-- OVERRIDES ...]

Default overrides: `cache.enabled=false logger=none` (the default digits run from a cold cache).
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

DRIVER = r"""
import json, sys, time
started = time.perf_counter()
import torch
torch_s = time.perf_counter() - started
import bdrun.cli as cli
import bdrun.context as context
import bdrun.plain_loop as plain_loop
import bdrun.report.console as console
import bdrun.runner as runner
cli_s = time.perf_counter() - started - torch_s
spent = {}
calls = {}

def timed(owner, name, label):
    inner = getattr(owner, name)
    def wrapper(*args, **kwargs):
        begun = time.perf_counter()
        try:
            return inner(*args, **kwargs)
        finally:
            spent[label] = spent.get(label, 0.0) + time.perf_counter() - begun
            calls[label] = calls.get(label, 0) + 1
    setattr(owner, name, wrapper)

timed(cli, "check_overrides", "check_overrides")
timed(cli, "_task", "task")
timed(runner, "run", "run")
timed(console, "print_summary", "summary")
timed(runner, "setup", "setup")
timed(plain_loop, "optimizer_and_scheduler", "optimizer")
timed(runner, "load_splits", "load_splits")
timed(context, "content_key", "content_key")
timed(context, "fit", "fit")
timed(context.Scorer, "evaluate", "evaluate")
timed(runner, "export_run", "write")
timed(runner, "write_json_atomic", "write")
sys.argv = ["bdrun", *sys.argv[1:]]
main_started = time.perf_counter()
try:
    cli.main()
except SystemExit:
    pass
print("PHASES " + json.dumps({"torch": torch_s, "cli": cli_s, "main": time.perf_counter() - main_started, "fit_calls": calls.get("fit", 0), **spent}))
"""


def one_run(overrides: list[str]) -> dict[str, float]:
    cache = tempfile.mkdtemp(prefix="bdrun-phases-cache-")
    work = tempfile.mkdtemp(prefix="bdrun-phases-cwd-")
    env = {**os.environ, "BDRUN_CACHE": cache, "CI": "true"}
    started = time.perf_counter()
    done = subprocess.run(
        [sys.executable, "-c", DRIVER, *overrides],
        cwd=work,
        env=env,
        capture_output=True,
        text=True,
        check=True,
    )
    wall = time.perf_counter() - started
    [line] = [ln for ln in done.stdout.splitlines() if ln.startswith("PHASES ")]
    phases = json.loads(line.removeprefix("PHASES "))
    task, run = phases.get("task", 0.0), phases.get("run", 0.0)
    return {
        "whole process (wall)": wall,
        "import torch": phases["torch"],
        "import bdrun.cli (Hydra, OmegaConf)": phases["cli"],
        "check_overrides": phases.get("check_overrides", 0.0),
        "Hydra's composition and job set-up": task - run - phases.get("summary", 0.0),
        "the run (bdrun.runner.run)": run,
        "  setup": phases.get("setup", 0.0),
        "    load_splits (data)": phases.get("load_splits", 0.0),
        "  content_key (cache key)": phases.get("content_key", 0.0),
        "  fit (training)": phases.get("fit", 0.0),
        "    fit calls": phases["fit_calls"],
        "    optimizer construction (torch imports torch._dynamo)": phases.get("optimizer", 0.0),
        "  evaluate (scoring)": phases.get("evaluate", 0.0),
        "  write (results, exports)": phases.get("write", 0.0),
        "summary printout": phases.get("summary", 0.0),
        "interpreter start and exit": wall - phases["torch"] - phases["cli"] - phases["main"],
    }


def bare_interpreter() -> float:
    started = time.perf_counter()
    subprocess.run([sys.executable, "-c", "pass"], check=True)
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("overrides", nargs="*", default=["cache.enabled=false", "logger=none"])
    args = parser.parse_args()
    runs = [one_run(args.overrides) for _ in range(args.repeats)]
    bare = [bare_interpreter() for _ in range(args.repeats)]
    print(f"bdrun {' '.join(args.overrides)}: {args.repeats} fresh processes")
    print("| phase | median | range |")
    print("|---|---|---|")
    for phase in runs[0]:
        values = [r[phase] for r in runs]
        if phase.strip() == "fit calls":
            print(f"| {phase} | {values[0]} | |")
            continue
        print(
            f"| {phase} | {statistics.median(values):.2f} s | "
            f"{min(values):.2f} to {max(values):.2f} |"
        )
    print(
        f"| (bare `python -c pass`) | {statistics.median(bare):.2f} s | "
        f"{min(bare):.2f} to {max(bare):.2f} |"
    )


if __name__ == "__main__":
    main()
