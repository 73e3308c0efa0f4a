"""STRIP's blend on CSAW-HackML faces: the authors' 1:1 sum against the average blend of
conf/tuning/defense_dataset/strip_csaw.yaml (docs/tuning/strip_csaw.md).

On the generated CSAW set of tests/test_pretrained_csaw.py (20 synthetic identities, 55x47x3,
a DeepID BadNet trained by bdrun and written out as Keras weights), `experiment=csaw
defense=strip` runs with this file (0.5 / 0.5) and with `defense.input_weight=1
defense.overlay_weight=1` (the authors' sum); in-process, one thread, a fresh model cache under
--out. Prints AUROC and the ASR / CCA after the filter.

    .venv/bin/python scripts/experiments/strip_csaw.py   # ~7 min on 2 busy cores
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from measure import ROOT, metric, num, pct, show

sys.path.insert(0, str(ROOT / "tests"))

from test_pretrained_csaw import defended, write_synthetic_csaw  # noqa: E402

BLENDS = {
    "authors' sum (1 / 1)": ("defense.input_weight=1.0", "defense.overlay_weight=1.0"),
    "this file (0.5 / 0.5)": (),
}


def make_csaw(root: Path) -> None:
    """The test module's data and BadNet (its `csaw` fixture), trained on one thread."""
    write_synthetic_csaw(root, "trainer.num_threads=1")


def main() -> None:
    parse = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parse.add_argument("--out", type=Path, default=ROOT / "outputs" / "experiments" / "strip_csaw")
    args = parse.parse_args()
    root = args.out.resolve()
    root.mkdir(parents=True, exist_ok=True)
    os.environ["BDRUN_CACHE"] = str(root / "cache" / "threads-1")
    make_csaw(root)
    rows = []
    for label, overrides in BLENDS.items():
        folder = root / label.split(" (")[0].replace(" ", "-").replace("'", "")
        # the test module's run of the csaw experiment on these files, on one thread
        results = defended(
            {"root": root}, folder, "defense=strip", "trainer.num_threads=1", *overrides
        )
        rows.append(
            [
                label,
                num(metric(results, "detection", "auroc")),
                f"{pct(metric(results, 'before', 'asr'))} -> {pct(metric(results, 'after', 'asr'))}",
                f"{pct(metric(results, 'before', 'cca'))} -> {pct(metric(results, 'after', 'cca'))}",
            ]
        )
    header = ["blend", "AUROC", "ASR before -> after", "CCA before -> after"]
    show("STRIP on the generated CSAW set (seed 0, 1 thread)", header, rows)


if __name__ == "__main__":
    main()
