"""MCR on Fashion-MNIST BadNets 10 %: the settings behind
conf/tuning/defense_dataset/mcr_fashion_mnist.yaml and MCR's defaults
(docs/tuning/mcr_fashion_mnist.md).

Every run is `bdrun dataset=fashion_mnist attack=badnets defense=mcr` plus the row's keys; rows
on the authors' settings undo the tuning file's four keys on the command line. The path is
scored on 2,000 test / backdoor inputs (`defense.path_samples=2000`) unless a row says full
test sets; the `after` figures (the model at `defense.t`) always use the full test sets. One
thread. Needs Fashion-MNIST (Debian's dataset-fashion-mnist); each run takes minutes on a CPU.

    .venv/bin/python scripts/experiments/mcr_fashion_mnist.py --dry-run
    .venv/bin/python scripts/experiments/mcr_fashion_mnist.py --only tuned tuned-seeds
"""

from __future__ import annotations

from measure import Sweep, labelled_results, measured_runs, metric, pct, show

BASE = ("dataset=fashion_mnist", "attack=badnets", "defense=mcr")
PATH_2000 = "defense.path_samples=2000"
# MCR's group defaults (the authors'), over the tuning file
AUTHORS = (
    *BASE,
    "defense.init=linear",
    "defense.lr=0.01",
    "defense.weight_decay=1e-4",
    "defense.t=0.3",
)
REGULARISED = (*BASE, "defense.lr=0.05", "defense.weight_decay=0.01")

SWEEPS = [
    Sweep("authors", (*AUTHORS, PATH_2000)),
    Sweep(
        "authors-finetune-lr-0.1",
        (*AUTHORS, PATH_2000, "defense.finetune_lr=0.1", "defense.finetune_epochs=50"),
    ),
    Sweep("retrain-linear", (*AUTHORS, "defense.end_model=retrain", "defense.lr=0.01,0.05")),
    Sweep(
        "random-init-lr-0.01",
        (*AUTHORS, PATH_2000, "defense.init=random", "defense.end_model=finetune,retrain"),
    ),
    Sweep(
        "retrain-random-lr-0.05",
        (
            *AUTHORS,
            PATH_2000,
            "defense.init=random",
            "defense.end_model=retrain",
            "defense.lr=0.05",
        ),
    ),
    Sweep(
        "regularised-retrain-random",
        (
            *REGULARISED,
            PATH_2000,
            "defense.init=random",
            "defense.end_model=retrain",
            "defense.epochs=100,200",
        ),
    ),
    Sweep("regularised-finetune-linear", (*REGULARISED, PATH_2000, "defense.init=linear")),
    Sweep("tuned", (*BASE, PATH_2000, "defense.t=0.3,0.35,0.4")),
    Sweep("tuned-wd-0.02", (*BASE, PATH_2000, "defense.weight_decay=0.02", "defense.t=0.3")),
    Sweep("tuned-seeds", (*BASE, "seed=1,2")),
]

# (label, sweep, job keys) in the page's order
ROWS = [
    ("authors' defaults (finetune end, linear, lr 0.01, wd 1e-4)", "authors", {}),
    ("finetune end at lr 0.1 for 50 epochs", "authors-finetune-lr-0.1", {}),
    ("retrain, linear, lr 0.01 (full test sets)", "retrain-linear", {"defense.lr": 0.01}),
    ("retrain, linear, lr 0.05 (full test sets)", "retrain-linear", {"defense.lr": 0.05}),
    (
        "finetune end, random init, lr 0.01",
        "random-init-lr-0.01",
        {"defense.end_model": "finetune"},
    ),  # fmt: skip
    ("retrain, random init, lr 0.01", "random-init-lr-0.01", {"defense.end_model": "retrain"}),
    ("retrain, random init, lr 0.05", "retrain-random-lr-0.05", {}),
    (
        "regulariser wd 0.01, lr 0.05: retrain + random init",
        "regularised-retrain-random",
        {"defense.epochs": 100},
    ),  # fmt: skip
    ("  the same, 200 curve epochs", "regularised-retrain-random", {"defense.epochs": 200}),
    ("regulariser wd 0.01, lr 0.05: finetune end + linear", "regularised-finetune-linear", {}),
    (
        "this file (finetune end + random init, wd 0.01, lr 0.05), t 0.3",
        "tuned",
        {"defense.t": 0.3},
    ),  # fmt: skip
    ("this file, t 0.35", "tuned", {"defense.t": 0.35}),
    ("this file, t 0.4", "tuned", {"defense.t": 0.4}),
    ("this file, wd 0.02, t 0.3", "tuned-wd-0.02", {}),
    ("this file, seed 1", "tuned-seeds", {"seed": 1}),
    ("this file, seed 2", "tuned-seeds", {"seed": 2}),
]
SHOWN_T = (0.2, 0.3, 0.4, 0.5, 1.0)


def path_at(results: dict | None, t: float) -> str:
    """'ASR / CCA' of the path point at t, or '-'."""
    for point in metric(results, "detection", "mcr_path") or []:
        if abs(point["t"] - t) < 1e-9:
            return f"{pct(point['asr'])} / {pct(point['cca'])}"
    return "-"


def path_minimum(results: dict | None) -> str:
    """The path's lowest ASR: 'ASR at t (CCA)', or '-'."""
    path = metric(results, "detection", "mcr_path") or []
    if not path:
        return "-"
    low = min(path, key=lambda point: point["asr"])
    return f"{pct(low['asr'])} at {low['t']:.1f} ({pct(low['cca'])})"


def main() -> None:
    runs = measured_runs(SWEEPS, __doc__, __file__)
    if runs is None:
        return
    rows = []
    for label, results in labelled_results(runs, ROWS):
        rows.append(
            [
                label,
                f"{pct(metric(results, 'before', 'asr'))} / {pct(metric(results, 'before', 'cca'))}",  # fmt: skip
                path_minimum(results),
                *(path_at(results, t) for t in SHOWN_T),
                f"{pct(metric(results, 'after', 'asr'))} / {pct(metric(results, 'after', 'cca'))}",
            ]
        )
    header = [
        "setting",
        "before ASR / CCA",
        "path: min ASR at t (CCA)",
        *(f"path t={t} ASR / CCA" for t in SHOWN_T),
        "after (defense.t) ASR / CCA",
    ]
    show("MCR on Fashion-MNIST BadNets 10 % (seed 0 unless named, 1 thread)", header, rows)


if __name__ == "__main__":
    main()
