"""Heatmaps of a metric over two swept parameters (cells annotated with the value)."""

from __future__ import annotations

import itertools
import logging
import math
import statistics
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from bdrun.report.plots import figure, save
from bdrun.report.table import sort_key

log = logging.getLogger(__name__)

MAX_HEATMAPS = 48  # a sweep over many parameters would otherwise write hundreds of figures


def heatmap(
    grid: Sequence[Sequence[float | None]],
    row_labels: Sequence[str],
    col_labels: Sequence[str],
    row_name: str,
    col_name: str,
    title: str,
    path: str | Path,
    cmap: str = "viridis",
    percent: bool = True,
) -> Path:
    """Draw `grid` (rows x columns, None for a missing cell) and save it as a PNG.

    Cells hold fractions in [0, 1] when `percent` (shown as percentages, colour scale fixed to
    0-100 % so figures of one sweep compare at a glance).
    """
    import numpy as np

    values = np.array(
        [[math.nan if v is None else float(v) for v in row] for row in grid], dtype=float
    )
    shown = values * 100 if percent else values
    width = max(4.0, 0.9 * len(col_labels) + 2.5)
    height = max(3.0, 0.6 * len(row_labels) + 1.8)
    fig, ax = figure(figsize=(width, height))
    masked = np.ma.masked_invalid(shown)
    limits = {"vmin": 0.0, "vmax": 100.0} if percent else {}
    image = ax.imshow(masked, cmap=cmap, aspect="auto", **limits)
    fig.colorbar(image, ax=ax, label="%" if percent else None)
    ax.set_xticks(range(len(col_labels)), labels=list(col_labels))
    ax.set_yticks(range(len(row_labels)), labels=list(row_labels))
    ax.set_xlabel(col_name)
    ax.set_ylabel(row_name)
    ax.set_title(title)
    low, high = (0.0, 100.0) if percent else (np.nanmin(shown), np.nanmax(shown))
    middle = (low + high) / 2 if np.isfinite(low) and np.isfinite(high) else 0.0
    for i in range(shown.shape[0]):
        for j in range(shown.shape[1]):
            value = shown[i, j]
            if math.isnan(value):
                continue
            text = f"{value:.1f}" if percent else f"{value:.3g}"
            # dark text on the bright end of viridis, light text on the dark end
            ax.text(j, i, text, ha="center", va="center", fontsize=8,
                    color="black" if value > middle else "white")  # fmt: skip
    return save(fig, path)


def _grid_value(groups: list[dict[str, Any]], fixed: dict[str, str], metric: str) -> float | None:
    """Mean of `metric` over the groups matching `fixed` (several groups: their mean)."""
    values = [
        g[f"{metric}_mean"]
        for g in groups
        if all(str(g.get(k, "")) == v for k, v in fixed.items())
        and g.get(f"{metric}_mean") is not None
    ]
    return statistics.fmean(values) if values else None


def _safe(text: str) -> str:
    return "".join(c if c.isalnum() or c in "._-" else "_" for c in text)[:80]


def heatmap_figures(groups: list[dict[str, Any]], swept: Sequence[str], folder: Path) -> list[Path]:
    """CCA and ASR after the defense over every pair of swept parameters (seeds averaged, the
    groups of bdrun.report.table.seed_groups); one figure per combination of the other swept
    parameters."""
    params = [k for k in swept if k != "seed"]
    values = {k: sorted({str(g.get(k, "")) for g in groups}, key=sort_key) for k in params}
    paths: list[Path] = []
    for row_key, col_key in itertools.combinations(params, 2):
        rest = [k for k in params if k not in (row_key, col_key)]
        for rest_values in itertools.product(*(values[k] for k in rest)):
            fixed_rest = dict(zip(rest, rest_values, strict=True))
            if not any(all(str(g.get(k, "")) == v for k, v in fixed_rest.items()) for g in groups):
                continue
            suffix = "".join(f"__{_safe(k)}={_safe(v)}" for k, v in fixed_rest.items())
            for metric, label, cmap in (
                ("after_cca", "CCA after", "viridis"),
                ("after_asr", "ASR after", "magma"),
            ):
                if len(paths) >= MAX_HEATMAPS:
                    log.warning("heatmaps capped at %d figures", MAX_HEATMAPS)
                    return paths
                grid = [
                    [
                        _grid_value(groups, {row_key: r, col_key: c, **fixed_rest}, metric)
                        for c in values[col_key]
                    ]
                    for r in values[row_key]
                ]
                title = label + "".join(f", {k}={v}" for k, v in fixed_rest.items())
                name = f"heatmap_{metric.removeprefix('after_')}_{_safe(row_key)}_x_{_safe(col_key)}{suffix}.png"
                paths.append(
                    heatmap(
                        grid,
                        values[row_key],
                        values[col_key],
                        row_key,
                        col_key,
                        title,
                        folder / name,
                        cmap=cmap,
                    )  # fmt: skip
                )
    return paths
