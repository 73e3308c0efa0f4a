"""Scatter plots of clean against trojaned inputs in a detector's 2-D feature plane (SentiNet's
fooled count against average confidence, Chou et al. Fig. 4)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch
from torch import Tensor

from bdrun.report.plots import figure, save


def clean_vs_trojaned_scatter(
    clean: Tensor,
    trojaned: Tensor,
    path: str | Path,
    curve: tuple[Tensor, Tensor] | None = None,
    level: Callable[[Tensor, Tensor], Tensor] | None = None,
    threshold: float | None = None,
    xlabel: str = "",
    ylabel: str = "",
    title: str = "",
    limits: tuple[float, float, float, float] = (0.0, 1.0, 0.0, 1.0),
) -> Path:
    """Points [N, 2] of both sets, an optional boundary `curve` (xs, ys), and the contour where
    `level(x, y)` equals `threshold` (the decision boundary), over `limits` (x0, x1, y0, y1);
    saved atomically as PNG; returns the path."""
    fig, ax = figure(figsize=(5.5, 4.5))
    for points, label, color in ((clean, "clean", "tab:blue"), (trojaned, "trojaned", "tab:red")):
        if len(points):
            ax.scatter(
                points[:, 0].numpy(), points[:, 1].numpy(), s=6, alpha=0.4, label=label, c=color
            )
    x0, x1, y0, y1 = limits
    if curve is not None:
        ax.plot(curve[0].numpy(), curve[1].numpy(), color="black", linewidth=1, label="boundary")
    if level is not None and threshold is not None:
        gx, gy = torch.meshgrid(
            torch.linspace(x0, x1, 201, dtype=torch.float64),
            torch.linspace(y0, y1, 201, dtype=torch.float64),
            indexing="xy",
        )
        values = level(gx.flatten(), gy.flatten()).view(gx.shape)
        if float(values.min()) < threshold < float(values.max()):
            ax.contour(
                gx.numpy(),
                gy.numpy(),
                values.numpy(),
                levels=[threshold],
                colors="black",
                linestyles="--",
                linewidths=1,
            )
            ax.plot([], [], color="black", linestyle="--", linewidth=1, label="threshold")
    pad_x, pad_y = 0.02 * (x1 - x0), 0.02 * (y1 - y0)
    ax.set_xlim(x0 - pad_x, x1 + pad_x)
    ax.set_ylim(y0 - pad_y, y1 + pad_y)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    if title:
        ax.set_title(title, fontsize=10)
    ax.legend(frameon=False, fontsize=8)
    return save(fig, path)
