"""ABL's unlearning on scikit-learn digits: the settings behind
conf/tuning/defense_dataset/abl_digits.yaml (docs/tuning/abl_digits.md).

The showcase `bdrun attack=sig defense=abl` (tuning files on) with the unlearning keys of each
row, one thread unless a row says two; then BadNets, blend and WaNet on two threads with this
file and with ABL's group defaults (`tuning.enabled=false`: on digits only abl_digits.yaml
applies to these runs).

    .venv/bin/python scripts/experiments/abl_digits.py            # ~15 min on 2 busy cores
    .venv/bin/python scripts/experiments/abl_digits.py --dry-run  # the bdrun commands only
"""

from __future__ import annotations

from measure import Sweep, measured_runs, metric, num, pct, pick, show

SHOWCASE = ("attack=sig", "defense=abl")
NO_STOP = (*SHOWCASE, "defense.unlearning_stop=null")

SWEEPS = [
    Sweep("stop-0.1", (*SHOWCASE, "defense.unlearning_stop=0.1", "defense.unlearning_lr=5e-4")),
    Sweep(
        "lr-5e-4",
        (
            *NO_STOP,
            "defense.unlearning_lr=5e-4",
            "defense.unlearning_epochs=10,20,30,50",
            "seed=0,1,2",
        ),  # fmt: skip
    ),
    Sweep("tuned", (*SHOWCASE, "seed=0,1,2")),
    Sweep("tuned-2-threads", (*SHOWCASE, "seed=0,1,2"), threads=2),
    Sweep("attacks-2-threads", ("attack=badnets,blend,wanet", "defense=abl"), threads=2),
    Sweep(
        "attacks-defaults-2-threads",
        ("attack=badnets,blend,wanet", "defense=abl", "tuning.enabled=false"),
        threads=2,
    ),
]


def figures(results: dict | None) -> list[str]:
    """CCA / ASR before and after, isolation precision, unlearning epochs run."""
    return [
        pct(metric(results, "before", "cca")),
        pct(metric(results, "before", "asr")),
        pct(metric(results, "after", "cca")),
        pct(metric(results, "after", "asr")),
        "-" if results is None else f"{metric(results, 'detection', 'precision'):.2f}",
        num(metric(results, "detection", "unlearning_epochs_run")),
    ]


def main() -> None:
    runs = measured_runs(SWEEPS, __doc__, __file__)
    if runs is None:
        return
    header = ["setting", "seed", "CCA before", "ASR before", "CCA after", "ASR after", "precision", "unlearning epochs"]  # fmt: skip
    rows = [["anchor, stop at 0.1, lr 5e-4", 0, *figures(pick(runs.get("stop-0.1", [])))]]
    for epochs in (10, 20, 30, 50):
        for seed in (0, 1, 2):
            results = pick(runs.get("lr-5e-4", []), defense__unlearning_epochs=epochs, seed=seed)
            rows.append([f"anchor, {epochs} epochs at lr 5e-4", seed, *figures(results)])
    for seed in (0, 1, 2):
        results = pick(runs.get("tuned", []), seed=seed)
        rows.append(["anchor, 30 epochs at lr 1e-3 (this file)", seed, *figures(results)])
    for seed in (0, 1, 2):
        results = pick(runs.get("tuned-2-threads", []), seed=seed)
        rows.append(["this file, 2 threads", seed, *figures(results)])
    show("ABL vs the showcase's SIG on digits (1 thread unless named)", header, rows)

    rows = []
    for attack in ("badnets", "blend", "wanet"):
        for sweep, label in (("attacks-2-threads", "this file"), ("attacks-defaults-2-threads", "ABL defaults")):  # fmt: skip
            results = pick(runs.get(sweep, []), attack=attack)
            rows.append([f"{attack}, {label}", 0, *figures(results)])
    show("Other digits attacks (seed 0, 2 threads)", header, rows)


if __name__ == "__main__":
    main()
