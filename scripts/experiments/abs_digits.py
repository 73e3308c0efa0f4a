"""ABS on scikit-learn digits (BadNets, target 0): the mask budget and logit term of
conf/tuning/defense_dataset/abs_digits.yaml (docs/tuning/abs_digits.md).

`bdrun defense=abs defense.steps=300` with the budget (`defense.max_trigger_size`) at the
authors' 6.25 % and this file's 15 %, each with and without the round-1 logit term
(`defense.logit_weight` 1 / 0); one thread. Prints each label's best REASR.

    .venv/bin/python scripts/experiments/abs_digits.py            # ~1 min on 2 busy cores
    .venv/bin/python scripts/experiments/abs_digits.py --dry-run  # the bdrun commands only
"""

from __future__ import annotations

from measure import Sweep, measured_runs, metric, num, pick, show

SWEEPS = [
    Sweep(
        "budget",
        (
            "attack=badnets",
            "defense=abs",
            "defense.steps=300",
            "defense.max_trigger_size=0.0625,0.15",
            "defense.logit_weight=0.0,1.0",
        ),
    ),
]


def main() -> None:
    runs = measured_runs(SWEEPS, __doc__, __file__)
    if runs is None:
        return
    rows = []
    for budget in ("0.0625", "0.15"):
        for logit in ("0.0", "1.0"):
            results = pick(
                runs.get("budget", []),
                defense__max_trigger_size=budget,
                defense__logit_weight=logit,
            )
            reasr = metric(results, "detection", "reasr") or []
            others = max(reasr[1:], default=None)
            rows.append(
                [
                    budget,
                    logit,
                    num(reasr[0] if reasr else None),
                    num(others),
                    " ".join(f"{r:.2f}" for r in reasr),
                    metric(results, "detection", "flagged_labels"),
                ]
            )
    header = ["max_trigger_size", "logit_weight", "REASR label 0", "max REASR others", "REASR per label", "flagged"]  # fmt: skip
    show("ABS on digits BadNets (target 0, seed 0, 300 steps, 1 thread)", header, rows)


if __name__ == "__main__":
    main()
