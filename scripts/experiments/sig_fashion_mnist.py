"""SIG's amplitude on Fashion-MNIST: the setting of
conf/tuning/attack_dataset/sig_fashion_mnist.yaml (docs/tuning/sig_fashion_mnist.md).

`bdrun dataset=fashion_mnist attack=sig` (no defense, the tuning file's delta overridden) with
training / test amplitude 40 / 40, 60 / 60 and 60 / 40; one thread. Needs Fashion-MNIST
(Debian's dataset-fashion-mnist); each run takes a few minutes on a CPU.

    .venv/bin/python scripts/experiments/sig_fashion_mnist.py --dry-run
"""

from __future__ import annotations

from measure import Sweep, measured_runs, metric, pct, pick, show

BASE = ("dataset=fashion_mnist", "attack=sig", "defense=none")
SWEEPS = [
    Sweep("delta", (*BASE, "attack.delta=40,60")),
    Sweep("delta-60-test-40", (*BASE, "attack.delta=60", "attack.test_delta=40")),
]


def main() -> None:
    runs = measured_runs(SWEEPS, __doc__, __file__)
    if runs is None:
        return
    settings = [
        ("40 / 40 (sig default)", pick(runs["delta"], attack__delta=40)),
        ("60 / 60 (this file)", pick(runs["delta"], attack__delta=60)),
        ("60 / 40 (the authors' test amplitude)", pick(runs["delta-60-test-40"])),
    ]
    rows = [
        [label, pct(metric(r, "before", "asr")), pct(metric(r, "before", "cca"))]
        for label, r in settings
    ]
    show("SIG on Fashion-MNIST (seed 0, 6 epochs, 1 thread)", ["delta train / test", "ASR", "CCA"], rows)  # fmt: skip


if __name__ == "__main__":
    main()
