"""The rich summaries printed at the end of every run and of every sweep."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from bdrun.report.collect import Summary
from bdrun.report.markdown import pct_pm
from bdrun.report.summary import SUMMARY_MD
from bdrun.report.table import MAIN_METRICS, job_row, seed_groups
from bdrun.tuning import tuning_line

ROWS = (("cca", "CCA (clean acc.)"), ("asr", "ASR (attack success)"), ("ra", "RA (robust acc.)"))


def _pct(value: float | None) -> str:
    return "-" if value is None or value != value else f"{100 * value:.2f}%"


def _delta(before: float | None, after: float | None) -> str:
    if before is None or after is None or before != before or after != after:
        return "-"
    diff = 100 * (after - before)
    return f"{diff:+.2f}"


def print_summary(results: dict[str, Any], run_dir: Path, console: Console | None = None) -> None:
    """Metrics before/after the defense, detection figures, timing, cache status, run folder."""
    console = console or Console()
    metrics = results["metrics"]
    title = f"{results['attack']} vs {results['defense']} on {results['dataset']} / {results['model']} (seed {results['seed']})"
    table = Table(title=title, title_justify="left")
    table.add_column("metric")
    table.add_column("before", justify="right")
    table.add_column("after", justify="right")
    table.add_column("Δ points", justify="right")
    degenerate = {stage: bool(metrics[stage].get("degenerate")) for stage in ("before", "after")}
    for key, label in ROWS:
        b, a = metrics["before"].get(key), metrics["after"].get(key)
        cells = [_pct(b), _pct(a)]
        if key == "asr":  # one label for every input is no backdoor: its ASR measures nothing
            cells = [
                f"{cell} (degenerate)" if degenerate[stage] else cell
                for cell, stage in zip(cells, degenerate, strict=True)
            ]
        table.add_row(label, *cells, _delta(b, a))
    enabled = ((results.get("config") or {}).get("tuning") or {}).get("enabled", True)
    tuning = tuning_line(results.get("tuning") or [], enabled)
    if tuning:
        console.print(tuning, soft_wrap=True, markup=False)
    console.print(table)
    for stage, is_degenerate in degenerate.items():
        if is_degenerate:
            share = metrics[stage].get("top_label_share") or 0.0
            console.print(
                f"warning: the model {stage} the defense gives one label to {100 * share:.1f} % of "
                "the clean test inputs (degenerate): its ASR is no measure of a backdoor",
                soft_wrap=True,
                markup=False,
            )
    detection = metrics.get("detection") or {}
    if detection:
        shown = ", ".join(
            f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
            for k, v in detection.items()
            if not isinstance(v, list | dict)
        )
        console.print(f"detection: {shown}")
        for warning in detection.get("warnings", []):
            console.print(f"warning: {warning}", soft_wrap=True, markup=False)
    timing = results["timing"]
    console.print(
        f"time: train {timing['train_s']:.1f}s, defense {timing['defense_s']:.1f}s, total {timing['total_s']:.1f}s"
        f"  |  model cache: {results['cache']['model']}"
    )
    console.print(f"run folder: {run_dir}", soft_wrap=True)


def print_sweep(summary: Summary, console: Console | None = None) -> None:
    """A short console table of the sweep (done rows, seeds averaged) and where the files are."""
    console = console or Console()
    rows = [job_row(r, summary.swept) for r in summary.records]
    groups = seed_groups(rows, summary.swept)
    keys = [k for k in summary.swept if k != "seed"]
    table = Table(
        title=f"{len(summary.done)} of {len(summary.records)} jobs done", title_justify="left"
    )
    for key in [*keys, "n", "CCA after", "ASR after", "RA after"]:
        table.add_column(key, justify="left" if key in keys else "right")
    if not groups:
        console.print(f"{len(summary.done)} of {len(summary.records)} jobs done")
        console.print(f"summary: {summary.root / SUMMARY_MD}", soft_wrap=True)
        return
    for group in groups[:40]:
        table.add_row(
            *(str(group.get(k, "")) for k in keys),
            str(group["n"]),
            *(
                pct_pm(group.get(f"after_{m}_mean"), group.get(f"after_{m}_std"))
                for m in MAIN_METRICS
            ),
        )
    if len(groups) > 40:
        table.caption = f"{len(groups) - 40} more rows in summary.md"
    console.print(table)
    console.print(f"summary: {summary.root / SUMMARY_MD}", soft_wrap=True)
