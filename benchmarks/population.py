"""Wall time of a whole model population, built and scored from one command.

    python benchmarks/population.py                       # digits, 25 + 25, local launcher
    python benchmarks/population.py fashion_mnist         # the 10 + 10 Fashion-MNIST one (slow)
    python benchmarks/population.py digits population.clean=3 population.backdoored=3 debug=smoke

Runs `bdrun-population NAME hydra/launcher=local OVERRIDES` with a fresh model cache (unless
BDRUN_CACHE is set) in a fresh population folder, then prints: the wall time, the load average
before and after, the jobs and model-cache misses, the mean seconds per model of training and
of each inspector, and the population's score table (population.md).
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bdrun.report.frame import load_runs
from bdrun.report.population import TABLE_MD


def main(argv: list[str]) -> int:
    name, overrides = (argv[0], argv[1:]) if argv else ("digits", [])
    work = Path(tempfile.mkdtemp(prefix=f"bdrun-population-{name}-"))
    env = dict(os.environ)
    env.setdefault("BDRUN_CACHE", str(work / "cache"))
    env.setdefault("WANDB_MODE", "offline")
    folder = work / "population"
    command = [
        sys.executable, "-m", "bdrun.population_cli", name, "hydra/launcher=local",
        "logger=none", f"hydra.sweep.dir={folder}", *overrides,
    ]  # fmt: skip
    load_before = os.getloadavg()
    started = time.perf_counter()
    done = subprocess.run(command, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - started
    load_after = os.getloadavg()
    print(f"command: bdrun-population {name} hydra/launcher=local {' '.join(overrides)}")
    print(f"exit status {done.returncode}; wall {wall:.0f} s on {os.cpu_count()} cores")
    print(f"load average before {load_before[0]:.2f}, after {load_after[0]:.2f}")
    if done.returncode != 0:
        print(done.stderr[-3000:])
    for line in done.stdout.splitlines():
        if "population scores" in line or "population not scored" in line:
            print(line)
    if not (folder / TABLE_MD).is_file():
        return 1
    frame = load_runs(folder)
    print(f"jobs {len(frame)}, failed {(frame['status'] != 'done').sum()}")
    print(f"model cache misses: {(frame['cache.model'] == 'miss').sum()}")
    models = frame.drop_duplicates("config.population.assigned.model_id")
    print(f"training, mean of the missed: "
          f"{frame.loc[frame['cache.model'] == 'miss', 'timing.train_s'].mean():.1f} s per model, "
          f"{len(models)} models")  # fmt: skip
    for inspector, group in frame.groupby("defense"):
        print(f"{inspector}: {group['timing.defense_s'].mean():.1f} s per model")
    print()
    print((folder / TABLE_MD).read_text())
    print(f"population folder: {folder}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
