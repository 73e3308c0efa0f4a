"""Summarise a folder of runs (a multirun sweep, or any folder holding run folders).

From the run folders (bdrun.report.collect):

- summary.csv: one row per job (overrides, swept parameters, CCA / ASR / RA before and after,
  detection figures, times, cache status, error), see bdrun.report.table;
- summary_seeds.csv: mean and sample std over seeds, when seeds were swept;
- summary.md: the same as a table, plus mean ± std over seeds, the failed jobs and why, and
  links to the figures (bdrun.report.markdown);
- figures/: heatmaps of CCA and ASR (after the defense) over every two swept parameters
  (bdrun.report.heatmaps), and an attack x defense matrix when the sweep covers several
  attacks or defenses (bdrun.report.matrix).

`bdrun-report PATH` (bdrun.report.cli) rebuilds them; a sweep's Hydra callback
(bdrun.report.sweep) calls `summarize` when the sweep ends.
"""

from __future__ import annotations

import csv
import io
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from bdrun.fs import atomic_dir, atomic_file
from bdrun.report.collect import FIGURES_DIR, Summary, collect, match_expected
from bdrun.report.markdown import markdown
from bdrun.report.table import columns, job_row, seed_groups, swept_parameters

SUMMARY_CSV = "summary.csv"
SUMMARY_SEEDS_CSV = "summary_seeds.csv"
SUMMARY_MD = "summary.md"


def write_csv(path: Path, rows: list[dict[str, Any]]) -> Path:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=columns(rows), extrasaction="ignore")
    writer.writeheader()
    writer.writerows(rows)
    with atomic_file(path) as tmp:
        tmp.write_text(buffer.getvalue())
    return path


def summarize(
    root: str | Path,
    expected: Sequence[Sequence[str]] | None = None,
    figures: bool = True,
) -> Summary:
    """Collect the runs under `root` and write summary.csv, summary.md and figures/ there.

    `expected` is the sweep's job list (overrides per job number); jobs in it that left no
    results and no error are reported as missing.
    """
    from bdrun.report.heatmaps import heatmap_figures
    from bdrun.report.matrix import matrix_markdown, write_matrix

    root = Path(root)
    records = collect(root)
    if expected is not None:
        records = match_expected(records, expected)
    swept = swept_parameters(records)
    summary = Summary(root, records, swept)
    if not records:
        return summary
    rows = [job_row(r, swept) for r in records]
    groups = seed_groups(rows, swept)
    figure_paths: list[Path] = []
    matrix_md = ""
    if figures and groups:
        with atomic_dir(root / FIGURES_DIR) as tmp:
            made = heatmap_figures(groups, swept, tmp)
            made += write_matrix(rows, tmp)
        figure_paths = [root / FIGURES_DIR / p.name for p in made]
        matrix_md = matrix_markdown(rows)
    text = markdown(summary, rows, groups, [p for p in figure_paths if p.suffix == ".png"])
    if matrix_md:
        text += "\n" + matrix_md
    summary.files = [write_csv(root / SUMMARY_CSV, rows)]
    if groups and any(g["n"] > 1 for g in groups):
        summary.files.append(write_csv(root / SUMMARY_SEEDS_CSV, groups))
    with atomic_file(root / SUMMARY_MD) as tmp:
        tmp.write_text(text)
    summary.files += [root / SUMMARY_MD, *figure_paths]
    return summary
