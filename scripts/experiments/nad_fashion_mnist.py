"""NAD on Fashion-MNIST BadNets 10 %: the settings behind
conf/tuning/defense_dataset/nad_fashion_mnist.yaml and NAD's defaults
(docs/tuning/nad_fashion_mnist.md).

Every run is `bdrun dataset=fashion_mnist attack=badnets defense=nad` plus the row's keys (the
tuning file applies below them: the authors' schedule is `defense.lr_epochs=2`, their padding
`defense.crop_padding=4`), one thread unless a row says two. Needs Fashion-MNIST (Debian's
dataset-fashion-mnist); each run takes minutes on a CPU, the whole list a few hours.

    .venv/bin/python scripts/experiments/nad_fashion_mnist.py --dry-run     # the commands
    .venv/bin/python scripts/experiments/nad_fashion_mnist.py --only tuned  # one sweep
"""

from __future__ import annotations

from measure import Sweep, labelled_results, measured_runs, metric, pct, show

BASE = ("dataset=fashion_mnist", "attack=badnets", "defense=nad")
AUTHORS = (*BASE, "defense.lr_epochs=2")  # their step schedule: two epochs at lr 0.1
PADDING_2 = (*AUTHORS, "defense.crop_padding=2")

SWEEPS = [
    Sweep("authors-padding", (*AUTHORS, "defense.crop_padding=4,3,2")),
    Sweep("padding-2-lr-0.05", (*PADDING_2, "defense.lr=0.05")),
    Sweep("padding-2-beta-1000", (*PADDING_2, "defense.betas=[1000.0]")),
    Sweep("padding-2-teacher-5", (*PADDING_2, "defense.teacher_epochs=5")),
    Sweep("padding-2-batch-128", (*PADDING_2, "defense.batch_size=128", "seed=0,1")),
    Sweep("tuned", (*BASE, "seed=0,1")),
    Sweep("tuned-2-threads", (*BASE, "seed=2"), threads=2),
    Sweep("tuned-beta-250", (*BASE, "defense.betas=[250.0]")),
    Sweep("tuned-padding-3", (*BASE, "defense.crop_padding=3", "seed=0,1")),
    Sweep("tuned-no-flip", (*BASE, "defense.flip=false")),
    Sweep("tuned-no-cutout", (*BASE, "defense.cutout=0")),
    Sweep("tuned-cutout-5", (*BASE, "defense.cutout=5", "seed=0,1")),
    Sweep("tuned-late-lr", (*BASE, "defense.late_lr=0.005")),
    Sweep("tuned-epochs", (*BASE, "defense.epochs=10,30")),
    Sweep("tuned-batch-128", (*BASE, "defense.batch_size=128")),
    Sweep(
        "no-augmentation",
        (*AUTHORS, "defense.crop_padding=0", "defense.flip=false", "defense.cutout=0"),
    ),
    Sweep("authors-lr-0.01", (*AUTHORS, "defense.crop_padding=4", "defense.lr=0.01")),
    Sweep("beta-5000", (*AUTHORS, "defense.crop_padding=4", "defense.betas=[5000.0]")),
    Sweep(
        "beta-5000-no-augmentation",
        (
            *AUTHORS,
            "defense.crop_padding=0",
            "defense.flip=false",
            "defense.cutout=0",
            "defense.betas=[5000.0]",
        ),
    ),
]

# (label, sweep, job keys) in the page's order
ROWS = [
    ("authors' (padding 4, 2 epochs at 0.1)", "authors-padding", {"defense.crop_padding": 4}),
    ("padding 3", "authors-padding", {"defense.crop_padding": 3}),
    ("padding 2", "authors-padding", {"defense.crop_padding": 2}),
    ("padding 2, lr 0.05", "padding-2-lr-0.05", {}),
    ("padding 2, beta 1000", "padding-2-beta-1000", {}),
    ("padding 2, teacher 5", "padding-2-teacher-5", {}),
    ("padding 2, batch 128", "padding-2-batch-128", {"seed": 0}),
    ("padding 2, batch 128, seed 1", "padding-2-batch-128", {"seed": 1}),
    ("this file (padding 2, 1 epoch at 0.1)", "tuned", {"seed": 0}),
    ("this file, seed 1", "tuned", {"seed": 1}),
    ("this file, seed 2, 2 threads", "tuned-2-threads", {}),
    ("this file, beta 250", "tuned-beta-250", {}),
    ("this file, padding 3", "tuned-padding-3", {"seed": 0}),
    ("this file, padding 3, seed 1", "tuned-padding-3", {"seed": 1}),
    ("this file, no flip", "tuned-no-flip", {}),
    ("this file, no cutout", "tuned-no-cutout", {}),
    ("this file, cutout 5", "tuned-cutout-5", {"seed": 0}),
    ("this file, cutout 5, seed 1", "tuned-cutout-5", {"seed": 1}),
    ("this file, late lr 0.005", "tuned-late-lr", {}),
    ("this file, 10 student epochs", "tuned-epochs", {"defense.epochs": 10}),
    ("this file, 30 student epochs", "tuned-epochs", {"defense.epochs": 30}),
    ("this file, batch 128", "tuned-batch-128", {}),
    ("authors' schedule, no augmentation", "no-augmentation", {}),
    ("authors' schedule, lr 0.01 throughout", "authors-lr-0.01", {}),
    ("authors' beta 5000", "beta-5000", {}),
    ("authors' beta 5000, no augmentation", "beta-5000-no-augmentation", {}),
]


def main() -> None:
    runs = measured_runs(SWEEPS, __doc__, __file__)
    if runs is None:
        return
    rows = []
    for label, results in labelled_results(runs, ROWS):
        rows.append(
            [
                label,
                pct(metric(results, "before", "cca")),
                pct(metric(results, "before", "asr")),
                pct(metric(results, "detection", "teacher_asr")),
                pct(metric(results, "detection", "teacher_cca")),
                pct(metric(results, "after", "asr")),
                pct(metric(results, "after", "cca")),
            ]
        )
    header = ["setting", "CCA before", "ASR before", "teacher ASR", "teacher CCA", "student ASR", "student CCA"]  # fmt: skip
    show("NAD on Fashion-MNIST BadNets 10 % (seed 0, 1 thread unless named)", header, rows)


if __name__ == "__main__":
    main()
