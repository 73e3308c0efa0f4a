"""Attack x defense matrix of a sweep over both groups: CCA and ASR after the defense, and the
AUROC of a detector's score where the defense has one (input detectors, model inspectors).

Each cell is the mean over every job with that attack and defense (seeds, other swept
parameters); the markdown table shows mean ± sample std and the number of jobs.
"""

from __future__ import annotations

import statistics
from pathlib import Path
from typing import Any

from bdrun.fs import atomic_file

METRICS = ("after_cca", "after_asr", "detection_auroc")


def cells(rows: list[dict[str, Any]]) -> tuple[list[str], list[str], dict[tuple[str, str], dict]]:
    """Attacks, defenses (first-seen order) and per-(attack, defense) mean/std/n of the metrics."""
    attacks: list[str] = []
    defenses: list[str] = []
    values: dict[tuple[str, str], dict[str, list[float]]] = {}
    for row in rows:
        if row.get("status") != "done":
            continue
        attack, defense = str(row.get("attack", "")), str(row.get("defense", ""))
        attacks += [] if attack in attacks else [attack]
        defenses += [] if defense in defenses else [defense]
        cell = values.setdefault((attack, defense), {metric: [] for metric in METRICS})
        for metric in cell:
            if isinstance(row.get(metric), int | float):
                cell[metric].append(float(row[metric]))
    summary = {}
    for key, cell in values.items():
        summary[key] = {"n": max(len(cell["after_cca"]), len(cell["after_asr"]))}
        for metric, numbers in cell.items():
            summary[key][metric] = statistics.fmean(numbers) if numbers else None
            summary[key][f"{metric}_std"] = statistics.stdev(numbers) if len(numbers) > 1 else 0.0
    return attacks, defenses, summary


def wanted(rows: list[dict[str, Any]]) -> bool:
    """A matrix says something once the sweep has two or more (attack, defense) pairs."""
    _, _, summary = cells(rows)
    return len(summary) >= 2


def _cell_text(cell: dict[str, Any] | None) -> str:
    if not cell or cell.get("after_cca") is None:
        return "-"
    text = f"{100 * cell['after_cca']:.1f} / {100 * cell['after_asr']:.1f}"
    if cell["n"] > 1:
        text += f" (±{100 * cell['after_cca_std']:.1f} / ±{100 * cell['after_asr_std']:.1f}, n={cell['n']})"
    if cell.get("detection_auroc") is not None:
        text += f"; AUROC {cell['detection_auroc']:.3f}"
        if cell["n"] > 1:
            text += f" ±{cell['detection_auroc_std']:.3f}"
    return text


def matrix_markdown(rows: list[dict[str, Any]]) -> str:
    """The matrix as a markdown section (empty when there is one pair only)."""
    if not wanted(rows):
        return ""
    attacks, defenses, summary = cells(rows)
    lines = [
        "## Attack x defense (CCA / ASR after the defense, %; AUROC of a detector's score)",
        "",
        "| attack \\ defense | " + " | ".join(defenses) + " |",
        "|---|" + "---|" * len(defenses),
    ]
    for attack in attacks:
        lines.append(
            f"| {attack} | "
            + " | ".join(_cell_text(summary.get((attack, d))) for d in defenses)
            + " |"
        )
    return "\n".join(lines) + "\n"


def write_matrix(rows: list[dict[str, Any]], folder: Path) -> list[Path]:
    """matrix.csv and heatmaps of CCA and ASR over attack x defense, when wanted."""
    if not wanted(rows):
        return []
    from bdrun.report.heatmaps import heatmap

    attacks, defenses, summary = cells(rows)
    header = ["n"] + [name for metric in METRICS for name in (metric, f"{metric}_std")]
    lines = ["attack,defense," + ",".join(header)]
    for attack in attacks:
        for defense in defenses:
            cell = summary.get((attack, defense))
            if cell:
                values = [attack, defense, *(cell[name] for name in header)]
                lines.append(",".join("" if v is None else str(v) for v in values))
    csv_path = folder / "matrix.csv"
    with atomic_file(csv_path) as tmp:
        tmp.write_text("\n".join(lines) + "\n")
    paths = [csv_path]
    for metric, label, cmap in (("after_cca", "CCA", "viridis"), ("after_asr", "ASR", "magma")):
        grid = [[(summary.get((a, d)) or {}).get(metric) for d in defenses] for a in attacks]
        paths.append(
            heatmap(
                grid,
                attacks,
                defenses,
                "attack",
                "defense",
                f"{label} after the defense",
                folder / f"matrix_{metric.removeprefix('after_')}.png",
                cmap=cmap,
            )  # fmt: skip
        )
    return paths
