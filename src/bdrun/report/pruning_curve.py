"""Curves of CCA, ASR and RA: against the fraction of channels pruned (pruning defenses), along
a path of models (MCR), ... (CSV, PNG, logger)."""

from __future__ import annotations

import csv
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from bdrun.fs import atomic_file
from bdrun.report.plots import figure, save

if TYPE_CHECKING:
    from bdrun.loggers import RunLogger

CURVE_COLUMNS = ("pruned", "fraction", "holdout_acc", "cca", "asr", "ra")
SERIES = (("cca", "CCA (clean test)"), ("asr", "ASR"), ("ra", "RA"))


def write_csv(path: Path, columns: Sequence[str], rows: Sequence[dict[str, Any]]) -> Path:
    """Rows (dicts) as a CSV file with these columns, written atomically."""
    with atomic_file(path) as tmp, open(tmp, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(columns)
        writer.writerows([[row.get(c) for c in columns] for row in rows])
    return path


def plot_curve(
    rows: Sequence[dict[str, Any]],
    path: Path,
    title: str,
    x_key: str = "fraction",
    x_label: str = "fraction of channels pruned",
    stops: Sequence[dict[str, Any]] = (),
) -> Path:
    """Line plot of CCA / ASR / RA (and the defender's holdout accuracy, dashed) against x_key;
    `stops` (dicts with x_key and `label`) become labelled vertical lines."""
    fig, ax = figure(figsize=(6.4, 4.0))
    xs = [row[x_key] for row in rows]
    for key, label in SERIES:
        ys = [row.get(key) for row in rows]
        if any(y is not None and y == y for y in ys):
            ax.plot(xs, ys, marker=".", markersize=3, label=label)
    holdout = [row.get("holdout_acc") for row in rows]
    if any(y is not None for y in holdout):
        ax.plot(xs, holdout, linestyle="--", color="grey", label="holdout acc. (defender)")
    for stop in stops:
        ax.axvline(stop[x_key], color="black", linewidth=0.6, alpha=0.5)
        ax.text(stop[x_key], 1.02, stop["label"], rotation=90, fontsize=7, va="bottom")
    ax.set_xlabel(x_label)
    ax.set_ylabel("rate")
    ax.set_ylim(-0.02, 1.02)
    ax.set_title(title, fontsize=9, pad=28 if stops else 6)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="center left")
    return save(fig, path)


def write_curve(
    run_dir: Path,
    stem: str,
    rows: Sequence[dict[str, Any]],
    logger: RunLogger | None,
    title: str,
    columns: Sequence[str],
    x_key: str,
    x_label: str,
    stops: Sequence[dict[str, Any]] = (),
) -> tuple[Path, Path]:
    """CCA / ASR / RA (and the defender's holdout accuracy) against any x (pruned fraction, a
    point t on a path, ...): <stem>.csv and <stem>.png in the run folder, also sent to the run's
    logger as a curve (a wandb table and line plot when that logger is on). Returns (csv, png)."""
    run_dir = Path(run_dir)
    if logger is not None:
        # the CSV logger writes <name>.csv itself; the atomic write below has the last word
        series = [c for c in ("cca", "asr", "ra", "holdout_acc") if c in columns]
        table = [[row.get(c) for c in columns] for row in rows]
        logger.log_curve(stem, list(columns), table, x=x_key, y=series, title=title)
    csv_path = write_csv(run_dir / f"{stem}.csv", columns, rows)
    png_path = plot_curve(rows, run_dir / f"{stem}.png", title, x_key, x_label, stops)
    if logger is not None:
        logger.log_image(stem, png_path)
    return csv_path, png_path


def write_pruning_curve(
    run_dir: Path,
    stem: str,
    rows: Sequence[dict[str, Any]],
    logger: RunLogger | None = None,
    title: str = "pruning curve",
    columns: Sequence[str] = CURVE_COLUMNS,
    stops: Sequence[dict[str, Any]] = (),
    x_key: str = "fraction",
    x_label: str = "fraction of channels pruned",
) -> tuple[Path, Path]:
    """`write_curve` with the pruning curve's columns and x-axis."""
    return write_curve(run_dir, stem, rows, logger, title, columns, x_key, x_label, stops)
