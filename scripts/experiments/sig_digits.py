"""SIG on scikit-learn digits against ABL at its defaults: the search behind
conf/tuning/attack_dataset/sig_digits.yaml (docs/tuning/sig_digits.md).

Every run is `bdrun attack=sig defense=abl tuning.enabled=false` with the attack's keys named
(so ABL keeps its group defaults, not tuning/defense_dataset/abl_digits.yaml), one thread unless
a row says two. Prints the page's tables and the clean nines' accuracy before and after ABL.

    .venv/bin/python scripts/experiments/sig_digits.py            # ~16 min on 2 busy cores
    .venv/bin/python scripts/experiments/sig_digits.py --dry-run  # the bdrun commands only
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from measure import Sweep, metric, parser, pct, pick, run_sweeps, show

BASE = ("attack=sig", "defense=abl", "tuning.enabled=false")
SINE = (*BASE, "attack.signal=sine", "attack.frequency=1", "attack.poison_rate=0.09")
RAMP = (*BASE, "attack.signal=ramp", "attack.delta=255")
TUNED = (*RAMP, "attack.poison_rate=0.09", "attack.target=9")  # the tuning file's attack
TARGETS = (0, 1, 3, 4, 5, 6, 7, 8)

SWEEPS = [
    Sweep("sig-defaults", BASE),
    Sweep("sine-8", (*SINE, "attack.delta=80", "attack.test_delta=160", "attack.target=8")),
    Sweep("sine-9", (*SINE, "attack.delta=255", "attack.target=9")),
    Sweep("ramp-targets", (*RAMP, "attack.poison_rate=0.09", "attack.target=0,1,3,4,5,6,7,8")),
    Sweep("ramp-target-7", (*RAMP, "attack.poison_rate=0.09", "attack.target=7", "seed=1,2")),
    Sweep("ramp-rates", (*RAMP, "attack.poison_rate=0.05,0.07", "attack.target=0,4,6,9")),
    Sweep("ramp-rate-0.03", (*RAMP, "attack.poison_rate=0.03", "attack.target=9")),
    Sweep("amplitude-160", (*TUNED, "attack.delta=160", "attack.test_delta=160,255")),
    Sweep("amplitude-200", (*TUNED, "attack.delta=200", "seed=0,1,2")),
    Sweep("tuned", (*TUNED, "seed=0,1,2")),
    Sweep("tuned-2-threads", (*TUNED, "seed=0,1,2"), threads=2),
    Sweep("isolation-last", (*TUNED, "defense.isolation_score=last", "seed=0,1,2")),
    Sweep("isolation-epochs", (*TUNED, "defense.isolation_epochs=5,20", "seed=0,1,2")),
    Sweep(
        "gentle-unlearning",
        (
            *TUNED,
            "defense.unlearning_lr=1e-4",
            "defense.unlearning_epochs=25",
            "defense.unlearning_stop=0.5",
            "seed=0,1,2",
        ),
    ),
]


def isolated(results: dict | None) -> str:
    """Poisons among the isolated samples (precision x removed), e.g. '11 of 11'."""
    precision, removed = (
        metric(results, "detection", "precision"),
        metric(results, "detection", "removed"),
    )
    if precision is None or removed is None:
        return "-"
    return f"{round(precision * removed)} of {removed}"


def row(label: str, results: dict | None) -> list[str]:
    """ASR / CCA before and after, isolation precision and poisons isolated."""
    return [
        label,
        pct(metric(results, "before", "asr")),
        pct(metric(results, "before", "cca")),
        pct(metric(results, "after", "asr")),
        pct(metric(results, "after", "cca")),
        f"{metric(results, 'detection', 'precision') or 0:.2f}" if results else "-",
        isolated(results),
    ]


def class_accuracy(folder: Path, out: Path, threads: int) -> list[tuple[float, float]]:
    """Per class, accuracy on the clean test images of the poisoned model (from the sweep's
    cache) and of the model ABL returned (exported to the job's model/ folder)."""
    from bdrun.compose import compose_config
    from bdrun.export import load_model
    from bdrun.metrics import predict
    from bdrun.report.collect import collect
    from bdrun.runner import prepare

    os.environ["BDRUN_CACHE"] = str(out / "cache" / f"threads-{threads}")
    overrides = next(r.overrides for r in collect(folder.parent) if r.folder == folder)
    with tempfile.TemporaryDirectory() as run_dir:
        prepared = prepare(compose_config(overrides), Path(run_dir))
    test = prepared.data.test
    before = predict(prepared.model, test.x)
    after = load_model(folder / "model").predict(test.x)
    return [
        (
            float((before[test.y == c] == c).float().mean()),
            float((after[test.y == c] == c).float().mean()),
        )
        for c in range(prepared.data.info.num_classes)
    ]


def main() -> None:
    args = parser(__doc__.split("\n\n")[0], __file__).parse_args()
    runs = run_sweeps(SWEEPS, args)
    if args.dry_run:
        return
    header = ["setting", "ASR before", "CCA before", "ASR after", "CCA after", "precision", "poisons isolated"]  # fmt: skip
    rows = [row("sig defaults (sine, delta 40, f 6, target 0, rate 0.05)", pick(runs["sig-defaults"]))]  # fmt: skip
    rows.append(row("sine, delta 80, test 160, target 8", pick(runs["sine-8"])))
    rows.append(row("sine, delta 255, target 9", pick(runs["sine-9"])))
    for target in TARGETS:
        rows.append(
            row(f"ramp, target {target}", pick(runs["ramp-targets"], attack__target=target))
        )
    for seed in (1, 2):
        rows.append(row(f"ramp, target 7, seed {seed}", pick(runs["ramp-target-7"], seed=seed)))
    for rate in ("0.05", "0.07"):
        for target in (0, 4, 6, 9):
            results = pick(runs["ramp-rates"], attack__poison_rate=rate, attack__target=target)
            rows.append(row(f"ramp, rate {rate}, target {target}", results))
    rows.append(row("ramp, rate 0.03, target 9", pick(runs["ramp-rate-0.03"])))
    show("Search (seed 0 unless named, 1 thread; rate 0.09, delta 255 unless named)", header, rows)

    rows = []
    for test_delta in (160, 255):
        results = pick(runs["amplitude-160"], attack__test_delta=test_delta)
        rows.append(row(f"delta 160, test {test_delta}", results))
    for seed in (0, 1, 2):
        rows.append(row(f"delta 200, seed {seed}", pick(runs["amplitude-200"], seed=seed)))
    show("Ramp amplitude, target 9, rate 0.09 (1 thread)", header, rows)

    rows = [row(f"1 thread, seed {s}", pick(runs["tuned"], seed=s)) for s in (0, 1, 2)]
    rows += [row(f"2 threads, seed {s}", pick(runs["tuned-2-threads"], seed=s)) for s in (0, 1, 2)]
    for seed in (0, 1, 2):
        results = pick(runs["isolation-last"], seed=seed)
        rows.append(row(f"isolation_score=last, seed {seed}", results))
    for epochs in (5, 20):
        for seed in (0, 1, 2):
            results = pick(runs["isolation-epochs"], defense__isolation_epochs=epochs, seed=seed)
            rows.append(row(f"isolation_epochs={epochs}, seed {seed}", results))
    for seed in (0, 1, 2):
        results = pick(runs["gentle-unlearning"], seed=seed)
        rows.append(row(f"unlearning lr 1e-4, 25 epochs, stop 0.5, seed {seed}", results))
    show("The tuning file's attack (ramp, target 9, rate 0.09, delta 255) vs ABL", header, rows)

    tuned = [r for r in runs.get("tuned", []) if r.results and r.results["seed"] == 0]
    if tuned and tuned[0].folder is not None and (tuned[0].folder / "model").is_dir():
        classes = class_accuracy(tuned[0].folder, args.out.resolve(), threads=1)
        rows = [[c, pct(before), pct(after)] for c, (before, after) in enumerate(classes)]
        show(
            "Clean test accuracy per class, seed 0, 1 thread",
            ["class", "before", "after ABL"],
            rows,
        )


if __name__ == "__main__":
    main()
