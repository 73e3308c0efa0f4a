"""summary.md of a sweep: counts, mean ± std over seeds, every job, failed jobs, figures."""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from bdrun.metrics import DEGENERATE_SHARE
from bdrun.report.collect import Summary
from bdrun.report.table import MAIN_METRICS, STAGES, columns

PCT_FIGURES = ("cca", "asr", "ra", "auroc", "frr", "far", "tpr_at_fpr_1", "tpr_at_fpr_5",
               "precision", "recall")  # fmt: skip


def _pct(value: Any) -> str:
    if value is None or value == "" or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return f"{100 * float(value):.2f}"


def pct_pm(mean: Any, std: Any) -> str:
    """A fraction's mean ± std over seeds in percent ("-" without a mean)."""
    if mean is None:
        return "-"
    return f"{100 * mean:.2f} ± {100 * (std or 0.0):.2f}"


def _seconds(value: Any) -> str:
    return "-" if value in (None, "") else f"{float(value):.1f}"


def _md_table(header: Sequence[str], rows: Iterable[Sequence[Any]]) -> str:
    def cell(value: Any) -> str:
        return str(value).replace("|", "\\|").replace("\n", " ")

    lines = [
        "| " + " | ".join(cell(h) for h in header) + " |",
        "|" + "|".join("---" for _ in header) + "|",
    ]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def _detection_columns(rows: list[dict[str, Any]]) -> list[str]:
    return [c for c in columns(rows) if c.startswith("detection_")]


def _format_detection(column: str, value: Any) -> str:
    name = column.removeprefix("detection_")
    if value is None or value == "":
        return "-"
    return _pct(value) if name in PCT_FIGURES else f"{float(value):.4g}"


def _figure(row: dict[str, Any], stage: str, metric: str) -> str:
    """A job's CCA / ASR / RA cell; the ASR of a degenerate model is marked as such."""
    text = _pct(row.get(f"{stage}_{metric}"))
    return f"{text} (degenerate)" if metric == "asr" and row.get(f"{stage}_degenerate") else text


def markdown(
    summary: Summary, rows: list[dict[str, Any]], groups: list[dict[str, Any]], figures: list[Path]
) -> str:
    """summary.md: counts, mean ± std over seeds, every job, failures, figures."""
    swept = summary.swept
    done, failed = summary.done, summary.failed
    parts = [f"# Sweep summary: {summary.root}", ""]
    counts = f"{len(summary.records)} jobs: {len(done)} done, {len(failed)} failed or missing."
    if swept:
        values = {k: {str(r.get(k, "")) for r in rows} for k in swept}
        counts += " Swept: " + ", ".join(f"`{k}` ({len(values[k])} values)" for k in swept) + "."
    parts += [counts, "", "Figures are percentages (CCA, ASR, RA after / before the defense)."]
    degenerate = [r["job"] for r in rows if r.get("before_degenerate") or r.get("after_degenerate")]
    if degenerate:
        parts += [
            "",
            f"Jobs {', '.join(map(str, degenerate))}: a degenerate model (one label for at least "
            f"{DEGENERATE_SHARE:.0%} of the clean test inputs); its ASR is no measure of a backdoor.",
        ]
    detection = _detection_columns(rows)
    group_keys = [k for k in swept if k != "seed"]
    if groups and any(g["n"] > 1 for g in groups):
        parts += ["", "## Mean ± std over seeds", ""]
        header = [
            *group_keys,
            "n",
            "CCA before",
            "ASR before",
            "CCA after",
            "ASR after",
            "RA after",
        ]
        body = [
            [
                *(g.get(k, "") for k in group_keys),
                g["n"],
                *(
                    pct_pm(g.get(f"{s}_{m}_mean"), g.get(f"{s}_{m}_std"))
                    for s, m in (
                        ("before", "cca"),
                        ("before", "asr"),
                        ("after", "cca"),
                        ("after", "asr"),
                        ("after", "ra"),
                    )
                ),
            ]
            for g in groups
        ]
        parts.append(_md_table(header, body))
    parts += ["", "## Jobs", ""]
    header = [
        "job",
        "status",
        *swept,
        *([] if "seed" in swept else ["seed"]),
        "CCA b",
        "ASR b",
        "RA b",
        "CCA a",
        "ASR a",
        "RA a",
        *(c.removeprefix("detection_") for c in detection),
        "train s",
        "defense s",
        "total s",
        "cache",
    ]
    body = []
    for row in rows:
        body.append(
            [
                row["job"],
                row["status"],
                *(row.get(k, "") for k in swept),
                *([] if "seed" in swept else [row.get("seed", "")]),
                *(_figure(row, s, m) for s in STAGES for m in MAIN_METRICS),
                *(_format_detection(c, row.get(c)) for c in detection),
                _seconds(row.get("train_s")),
                _seconds(row.get("defense_s")),
                _seconds(row.get("total_s")),
                row.get("cache", ""),
            ]
        )
    parts.append(_md_table(header, body))
    if failed:
        parts += ["", "## Failed jobs", ""]
        for record in failed:
            where = f" ({record.folder})" if record.folder else ""
            parts.append(
                f"- job {record.job_num} `{' '.join(record.overrides)}`{where}: {record.error}"
            )
    if figures:
        parts += ["", "## Figures", ""]
        for path in figures:
            rel = path.relative_to(summary.root)
            parts += [f"![{path.stem}]({rel.as_posix()})", ""]
    return "\n".join(parts).rstrip() + "\n"
