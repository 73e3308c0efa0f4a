"""ABS on Fashion-MNIST: the stimulated layer of
conf/tuning/defense_dataset/abs_fashion_mnist.yaml (docs/tuning/abs_fashion_mnist.md).

`bdrun dataset=fashion_mnist defense=abs defense.steps=300` on BadNets 10 %, a clean model and
blend with this file's layer (relu3), and on BadNets with the last conv activation (relu2); one
thread. Prints each label's best REASR and the best candidate. Needs Fashion-MNIST (Debian's
dataset-fashion-mnist); each model takes minutes on a CPU.

    .venv/bin/python scripts/experiments/abs_fashion_mnist.py --dry-run
"""

from __future__ import annotations

from measure import Sweep, measured_runs, metric, num, pick, show

BASE = ("dataset=fashion_mnist", "defense=abs", "defense.steps=300")
SWEEPS = [
    Sweep("relu3", (*BASE, "attack=badnets,none,blend")),
    Sweep("relu2", (*BASE, "attack=badnets", "defense.layer=relu2")),
]


def main() -> None:
    runs = measured_runs(SWEEPS, __doc__, __file__)
    if runs is None:
        return
    rows = []
    for sweep, attack in (("relu3", "badnets"), ("relu3", "none"), ("relu3", "blend"), ("relu2", "badnets")):  # fmt: skip
        results = pick(runs.get(sweep, []), attack=attack)
        reasr = metric(results, "detection", "reasr") or []
        candidates = metric(results, "detection", "candidates") or []
        best = max(candidates, key=lambda c: c["reasr"], default=None)
        rows.append(
            [
                f"{attack}, {sweep}",
                " ".join(f"{r:.2f}" for r in reasr),
                "-"
                if best is None
                else f"label {best['label']}, neuron {best['neuron']}, {best['reasr']:.2f}",  # fmt: skip
                metric(results, "detection", "flagged_labels"),
                num(metric(results, "detection", "reverse_s"), 0),
            ]
        )
    header = ["model, layer", "REASR per label", "best candidate", "flagged", "reverse s"]
    show("ABS on Fashion-MNIST (seed 0, 300 steps, 1 thread)", header, rows)


if __name__ == "__main__":
    main()
