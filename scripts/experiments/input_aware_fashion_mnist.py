"""Input-aware's mask pre-training on Fashion-MNIST: the one epoch of
conf/tuning/attack_dataset/input_aware_fashion_mnist.yaml (docs/tuning/input_aware_fashion_mnist.md).

`bdrun dataset=fashion_mnist attack=input_aware` with `attack.mask_epochs` 0 and 1 (this file);
one thread, each run with a fresh cache. Prints the mask area the run reports (target 0.032),
ASR / CCA, and the cost of one mask epoch in classifier epochs (the difference of the two runs'
total times over the time of one classifier epoch). Needs Fashion-MNIST (Debian's
dataset-fashion-mnist); each run takes several minutes on a CPU.

    .venv/bin/python scripts/experiments/input_aware_fashion_mnist.py --dry-run
"""

from __future__ import annotations

from measure import Sweep, measured_runs, metric, num, pct, pick, show

SWEEPS = [Sweep("mask-epochs", ("dataset=fashion_mnist", "attack=input_aware", "attack.mask_epochs=0,1"))]  # fmt: skip


def main() -> None:
    runs = measured_runs(SWEEPS, __doc__, __file__)
    if runs is None:
        return
    none, one = (pick(runs["mask-epochs"], attack__mask_epochs=n) for n in (0, 1))
    rows = []
    for epochs, results in ((0, none), (1, one)):
        rows.append(
            [
                epochs,
                num(metric(results, "before", "mask_area"), 4),
                pct(metric(results, "before", "asr")),
                pct(metric(results, "before", "cca")),
                num((results or {}).get("timing", {}).get("train_s"), 0),
                num((results or {}).get("timing", {}).get("total_s"), 0),
            ]
        )
    header = ["mask_epochs", "mask_area", "ASR", "CCA", "train s", "total s"]
    show("Input-aware on Fashion-MNIST (seed 0, 1 thread)", header, rows)
    if none and one:
        classifier_epoch = none["timing"]["train_s"] / none["config"]["train"]["epochs"]
        mask_epoch = one["timing"]["total_s"] - none["timing"]["total_s"]
        print(f"\none mask epoch ~ {mask_epoch / classifier_epoch:.1f} classifier epochs")


if __name__ == "__main__":
    main()
