"""Cost per model (seconds of the defense stage) of the model inspectors on this CPU.

.venv/bin/python benchmarks/inspector_cost.py [--datasets digits fashion_mnist] [--threads 1]

Runs `bdrun dataset=<d> attack=badnets defense=<inspector> logger=none` through the shared model
cache ($BDRUN_CACHE; the poisoned model is trained once per dataset, not timed) and prints the
`defense` time of results.json per inspector and dataset, with what it flagged. Neural Cleanse
runs with a reduced budget (samples_per_step=320, at most 300 steps; the authors' 1000 x 1000 is
hours here); ABS with its default 1000 reversal steps unless --abs-steps is given.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

INSPECTORS = {
    "neural_cleanse": [
        "defense.mitigation=none",
        "defense.samples_per_step=320",
        "defense.steps=300",
    ],
    "neuron_inspect": [],
    "abs": [],
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--datasets", nargs="+", default=["digits", "fashion_mnist"])
    parser.add_argument("--inspectors", nargs="+", default=list(INSPECTORS))
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--abs-steps", type=int, default=None)
    args = parser.parse_args()
    bdrun = Path(sys.executable).with_name("bdrun")
    print("| dataset | inspector | defense s | flagged | max anomaly index |")
    print("|---|---|---|---|---|")
    for dataset in args.datasets:
        for name in args.inspectors:
            extra = list(INSPECTORS[name])
            if name == "abs" and args.abs_steps is not None:
                extra.append(f"defense.steps={args.abs_steps}")
            with tempfile.TemporaryDirectory() as folder:
                subprocess.run(
                    [str(bdrun), f"dataset={dataset}", "attack=badnets", f"defense={name}",
                     "logger=none", f"trainer.num_threads={args.threads}",
                     f"hydra.run.dir={folder}", *extra],
                    check=True, capture_output=True,
                )  # fmt: skip
                results = json.loads((Path(folder) / "results.json").read_text())
            detection = results["metrics"]["detection"]
            print(
                f"| {dataset} | {name} | {results['timing']['defense_s']:.1f} | "
                f"{detection['flagged_labels']} | {detection['max_anomaly_index']:.2f} |",
                flush=True,
            )


if __name__ == "__main__":
    main()
