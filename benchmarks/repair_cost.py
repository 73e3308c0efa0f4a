"""Cost per model (seconds of the defense stage) of the model-repair defenses on this CPU.

.venv/bin/python benchmarks/repair_cost.py [--datasets digits fashion_mnist] [--threads 2]

Runs `bdrun dataset=<d> model=small_cnn_bn attack=badnets defense=<repair> logger=none` through
the shared model cache ($BDRUN_CACHE; the poisoned model is trained once per dataset, not timed)
with each defense's defaults, and prints the `defense` time of results.json per repair and
dataset, beside fine-tuning (`finetune`, 10 epochs on the holdout) as the yardstick, with the
CCA and ASR after the repair.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

REPAIRS = ("finetune", "clp", "anp", "rnp", "i_bau", "sau", "ft_sam", "fst")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--datasets", nargs="+", default=["digits", "fashion_mnist"])
    parser.add_argument("--repairs", nargs="+", default=list(REPAIRS))
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    bdrun = Path(sys.executable).with_name("bdrun")
    print("| dataset | repair | defense s | CCA after | ASR after |")
    print("|---|---|---|---|---|")
    for dataset in args.datasets:
        for name in args.repairs:
            with tempfile.TemporaryDirectory() as folder:
                subprocess.run(
                    [str(bdrun), f"dataset={dataset}", "model=small_cnn_bn", "attack=badnets",
                     f"defense={name}", "logger=none", f"trainer.num_threads={args.threads}",
                     f"hydra.run.dir={folder}"],
                    check=True, capture_output=True,
                )  # fmt: skip
                results = json.loads((Path(folder) / "results.json").read_text())
            after = results["metrics"]["after"]
            print(
                f"| {dataset} | {name} | {results['timing']['defense_s']:.1f} | "
                f"{100 * after['cca']:.2f} % | {100 * after['asr']:.2f} % |",
                flush=True,
            )


if __name__ == "__main__":
    main()
