"""ABL's own defaults (isolation score, unlearning loss and stop, clean anchor) measured on
Fashion-MNIST and digits (docs/defenses/abl.md).

Each row is `bdrun defense=abl` with the row's keys, one thread. The isolation rows stop after
isolation (`defense.finetune_epochs=0 defense.unlearning_epochs=0`): the poisons among the
lowest-loss 1 % do not depend on the later stages, and the isolation stage holds its learning
rate constant, so a run of k isolation epochs with `isolation_score=last` is the snapshot after
epoch k. The Fashion-MNIST sweeps need Debian's dataset-fashion-mnist and take hours in all; the
digits ones take a few minutes (`--only digits-isolation digits-ascent`).

    .venv/bin/python scripts/experiments/abl_defaults.py --dry-run
"""

from __future__ import annotations

from measure import Sweep, measured_runs, metric, num, pct, pick, show

FASHION = ("dataset=fashion_mnist", "attack=badnets", "defense=abl")
ISOLATION_ONLY = ("defense.finetune_epochs=0", "defense.unlearning_epochs=0")
ASCENT = ("defense.unlearning_loss=ascent", "defense.unlearning_stop=null")

SWEEPS = [
    Sweep(
        "fashion-snapshots",
        (
            *FASHION,
            *ISOLATION_ONLY,
            "defense.isolation_score=last",
            "defense.isolation_epochs=4,5,6,7,8,9,10",
        ),  # fmt: skip
    ),
    Sweep("fashion-late-max", (*FASHION, *ISOLATION_ONLY)),
    Sweep("fashion-ascent", (*FASHION, *ASCENT, "defense.unlearning_lr=5e-4,5e-3,5e-2")),
    Sweep(
        "fashion-margin",
        (*FASHION, "defense.unlearning_stop=null", "defense.unlearning_epochs=1,5"),
    ),  # fmt: skip
    Sweep("fashion-default", FASHION),
    Sweep(
        "fashion-anchor",
        (
            *FASHION,
            "defense.unlearning_anchor=holdout",
            "defense.unlearning_stop=null",
            "defense.unlearning_epochs=30",
            "defense.unlearning_lr=1e-3",
        ),  # fmt: skip
    ),
    Sweep("fashion-sig", ("dataset=fashion_mnist", "attack=sig", "defense=abl")),
    Sweep(
        "digits-isolation",
        (
            "attack=badnets",
            "defense=abl",
            *ISOLATION_ONLY,
            "defense.isolation_score=late_max,last",
            "seed=0,1,2",
        ),  # fmt: skip
    ),
    Sweep("digits-ascent", ("attack=badnets", "defense=abl", "tuning.enabled=false", *ASCENT)),
]


def main() -> None:
    runs = measured_runs(SWEEPS, __doc__, __file__)
    if runs is None:
        return
    rows = []
    for epochs in range(4, 11):
        results = pick(runs["fashion-snapshots"], defense__isolation_epochs=epochs)
        rows.append([f"last, after epoch {epochs}", pct(metric(results, "detection", "precision"))])
    results = pick(runs["fashion-late-max"])
    rows.append(["late_max, 10 epochs", pct(metric(results, "detection", "precision"))])
    show("Fashion-MNIST BadNets 10 %: poisons among the lowest-loss 1 % (seed 0)", ["isolation_score", "poisons %"], rows)  # fmt: skip

    rows = []
    for seed in (0, 1, 2):
        for score in ("late_max", "last"):
            results = pick(runs["digits-isolation"], defense__isolation_score=score, seed=seed)
            rows.append([f"{score}, seed {seed}", pct(metric(results, "detection", "precision"))])
    show(
        "Digits BadNets: poisons among the lowest-loss 1 %", ["isolation_score", "poisons %"], rows
    )

    def unlearning_row(label: str, results: dict | None) -> list[str]:
        return [
            label,
            pct(metric(results, "before", "asr")),
            pct(metric(results, "before", "cca")),
            pct(metric(results, "after", "asr"), 2),
            pct(metric(results, "after", "cca")),
            pct(metric(results, "detection", "isolated_acc_after")),
            num(metric(results, "detection", "removed")),
            pct(metric(results, "detection", "precision")),
        ]

    rows = [
        unlearning_row(f"ascent, lr {lr}", pick(runs["fashion-ascent"], defense__unlearning_lr=lr))
        for lr in ("5e-4", "5e-3", "5e-2")
    ]
    for epochs in (1, 5):
        results = pick(runs["fashion-margin"], defense__unlearning_epochs=epochs)
        rows.append(unlearning_row(f"margin, {epochs} epochs, no stop", results))
    rows.append(unlearning_row("margin, stop 0.1 (default)", pick(runs["fashion-default"])))
    rows.append(unlearning_row("margin, holdout anchor, 30 epochs at 1e-3", pick(runs["fashion-anchor"])))  # fmt: skip
    rows.append(unlearning_row("digits BadNets, ascent, lr 5e-4", pick(runs["digits-ascent"])))
    header = ["unlearning (Fashion-MNIST BadNets 10 % unless named)", "ASR before", "CCA before", "ASR after", "CCA after", "isolated still on their label", "isolated", "precision"]  # fmt: skip
    show("Unlearning (seed 0)", header, rows)

    results = pick(runs["fashion-sig"])
    print(
        f"\nFashion-MNIST SIG: isolated_top_label_share "
        f"{metric(results, 'detection', 'isolated_top_label_share')}, precision "
        f"{metric(results, 'detection', 'precision')}, CCA after "
        f"{pct(metric(results, 'after', 'cca'))} %, ASR after {pct(metric(results, 'after', 'asr'))} %"  # fmt: skip
    )


if __name__ == "__main__":
    main()
