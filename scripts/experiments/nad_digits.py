"""NAD on scikit-learn digits (BadNets): the authors' settings against
conf/tuning/defense_dataset/nad_digits.yaml (docs/tuning/nad_digits.md).

`bdrun defense=nad` with the tuning file and with `tuning.enabled=false` (NAD's group defaults,
the authors'), on one and on two threads (the recording does not name its thread count).

    .venv/bin/python scripts/experiments/nad_digits.py            # ~2 min on 2 busy cores
    .venv/bin/python scripts/experiments/nad_digits.py --dry-run  # the bdrun commands only
"""

from __future__ import annotations

from measure import Sweep, measured_runs, metric, pct, pick, show

SWEEPS = [
    Sweep("threads-1", ("attack=badnets", "defense=nad", "tuning.enabled=true,false")),
    Sweep("threads-2", ("attack=badnets", "defense=nad", "tuning.enabled=true,false"), threads=2),
]


def main() -> None:
    runs = measured_runs(SWEEPS, __doc__, __file__)
    if runs is None:
        return
    rows = []
    for sweep, threads in (("threads-1", 1), ("threads-2", 2)):
        for enabled, label in (("false", "authors' (NAD defaults)"), ("true", "this file")):
            results = pick(runs.get(sweep, []), tuning__enabled=enabled)
            rows.append(
                [
                    label,
                    threads,
                    pct(metric(results, "before", "cca")),
                    pct(metric(results, "before", "asr")),
                    pct(metric(results, "detection", "teacher_cca")),
                    pct(metric(results, "detection", "teacher_asr")),
                    pct(metric(results, "after", "cca")),
                    pct(metric(results, "after", "asr")),
                ]
            )
    header = ["setting", "threads", "CCA before", "ASR before", "teacher CCA", "teacher ASR", "student CCA", "student ASR"]  # fmt: skip
    show("NAD on digits BadNets (seed 0)", header, rows)


if __name__ == "__main__":
    main()
