"""CCA / ASR / RA and training time of every attack on Fashion-MNIST with the small CNN (CPU).

.venv/bin/python benchmarks/attack_fidelity.py [--attacks blend sig ...] [--threads 1] [--out DIR]
                                               [--dataset fashion_mnist]

Runs `bdrun dataset=fashion_mnist attack=<name> logger=none` one attack at a time (CPU is the
bottleneck) with a fresh model cache under --out, so every training time is a real one; the
surrogate clean model that clean_label, subpopulation and pruning_aware share is trained once
(its time is not in their train_s, except pruning_aware's, which trains it as stage 1). Prints
a markdown table with the extra figures each attack reports.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ATTACKS = [
    "none",
    "blend",
    "sig",
    "clean_label",
    "wanet",
    "input_aware",
    "pruning_aware",
    "multi_trigger",
    "subpopulation",
]


def run_attack(name: str, out: Path, threads: int, dataset: str) -> dict:
    folder = out / name
    subprocess.run(
        [
            sys.executable,
            "-m",
            "bdrun.cli",
            f"dataset={dataset}",
            f"attack={name}",
            "logger=none",
            f"trainer.num_threads={threads}",
            f"cache.dir={out / 'cache'}",
            f"hydra.run.dir={folder}",
        ],
        check=True,
        capture_output=True,
        env={**os.environ, "CI": "true"},
    )
    return json.loads((folder / "results.json").read_text())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--attacks", nargs="+", default=ATTACKS)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--dataset", default="fashion_mnist")
    args = parser.parse_args()
    out = args.out or Path(tempfile.mkdtemp(prefix="bdrun-attack-fidelity-"))
    print("| attack | CCA | ASR | RA | train s | other figures |")
    print("|---|---|---|---|---|---|")
    for name in args.attacks:
        results = run_attack(name, out, args.threads, args.dataset)
        before = dict(results["metrics"]["before"])
        main_figures = [before.pop(k) for k in ("cca", "asr", "ra")]
        others = ", ".join(
            f"{k} {v:.4f}" if isinstance(v, float) else f"{k} {v}" for k, v in before.items()
        )
        cells = " | ".join(f"{100 * v:.2f}%" for v in main_figures)
        print(f"| {name} | {cells} | {results['timing']['train_s']:.0f} | {others} |", flush=True)
    print(f"runs and cache: {out}")


if __name__ == "__main__":
    main()
