"""One parameter choice of a defense, measured on Fashion-MNIST BadNets 10 % (the pages under
docs/defenses/: strip, suppression, gradient_clustering, sentinet).

    .venv/bin/python scripts/experiments/defense_choices.py PAGE [--dry-run]

Each page's sweep is `bdrun dataset=fashion_mnist attack=badnets defense=NAME` plus the swept
key; one thread. Needs Debian's dataset-fashion-mnist; each sweep takes several minutes to an
hour on a CPU.
"""

from __future__ import annotations

from measure import Sweep, metric, num, parser, pct, run_sweeps, show

BASE = ("dataset=fashion_mnist", "attack=badnets")
# page -> (sweep, the swept key, the detection figures printed)
PAGES = {
    "strip": (
        Sweep("strip", (*BASE, "defense=strip", "defense.clip=true,false", "dataset.max_test=400")),
        "defense.clip",
        ("auroc", "tpr_at_fpr_1"),
    ),
    "suppression": (
        Sweep(
            "suppression",
            (*BASE, "defense=suppression", "defense.noise=0.2,0.4,0.6", "dataset.max_test=2000"),
        ),
        "defense.noise",
        (),
    ),
    "gradient_clustering": (
        Sweep(
            "gradient_clustering",
            (*BASE, "defense=gradient_clustering", "defense.features=log,abs,signed"),
        ),
        "defense.features",
        ("precision", "recall", "removed"),
    ),
    "sentinet": (
        Sweep(
            "sentinet",
            (*BASE, "defense=sentinet", "defense.layer=conv2,pool2", "dataset.max_test=150"),
        ),
        "defense.layer",
        ("auroc", "tpr_at_fpr_1"),
    ),
}


def main() -> None:
    parse = parser(__doc__.split("\n\n")[0], __file__)
    parse.add_argument("page", choices=sorted(PAGES))
    args = parse.parse_args()
    sweep, key, figures = PAGES[args.page]
    runs = run_sweeps([sweep], args)
    if args.dry_run:
        return
    rows = []
    for record in runs[sweep.name]:
        results = record.results
        rows.append(
            [
                record.params.get(key),
                f"{pct(metric(results, 'before', 'cca'))} / {pct(metric(results, 'before', 'asr'))}",
                f"{pct(metric(results, 'after', 'cca'))} / {pct(metric(results, 'after', 'asr'))}",
                *(num(metric(results, "detection", f), 3) for f in figures),
            ]
        )
    header = [key, "CCA / ASR before", "CCA / ASR after", *figures]
    show(f"{args.page} on Fashion-MNIST BadNets 10 % (seed 0, 1 thread)", header, rows)


if __name__ == "__main__":
    main()
