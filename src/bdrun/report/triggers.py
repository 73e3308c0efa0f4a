"""Images of the model inspectors: reversed triggers (Neural Cleanse, ABS) as mask and masked
pattern per label, and NeuronInspect's mean saliency heatmap per label."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch
from torch import Tensor

from bdrun.fs import atomic_file
from bdrun.report.plots import figure, save


def _image(t: Tensor) -> Tensor:
    """[C, H, W] in [0, 1] -> what imshow takes: [H, W] for one channel, [H, W, 3] for colour."""
    t = t.detach().float().clamp(0, 1).cpu()
    return t[0] if t.shape[0] == 1 else t.permute(1, 2, 0)


def plot_reversed_triggers(
    masks: Tensor,
    patterns: Tensor,
    labels: Sequence[int],
    l1: Sequence[float],
    anomaly_index: Sequence[float],
    flagged: Sequence[int],
    path: Path,
    max_labels: int = 20,
    title: str = "Neural Cleanse reversed triggers (smallest L1 first; red = flagged)",
    score_name: str = "AI",
    order: Sequence[int] | None = None,
) -> Path:
    """A grid, one column per label (the `max_labels` smallest masks first, or the columns in
    `order`): the mask on top, mask * pattern (what gets stamped) below, titled with the label,
    the mask's L1 norm and `score_name` (anomaly index); flagged labels are titled in red."""
    if order is None:
        order = sorted(range(len(labels)), key=lambda i: l1[i])
    order = list(order)[:max_labels]
    columns = max(len(order), 1)
    fig, axes = figure(nrows=2, ncols=columns, figsize=(1.3 * columns + 0.6, 3.2), squeeze=False)
    for col, i in enumerate(order):
        fusion = masks[i] * patterns[i]
        grey = dict(cmap="gray", vmin=0, vmax=1)
        axes[0][col].imshow(_image(masks[i]), **grey)
        axes[1][col].imshow(_image(fusion), **(grey if fusion.shape[0] == 1 else {}))
        colour = "red" if labels[i] in flagged else "black"
        axes[0][col].set_title(
            f"{labels[i]}\nL1 {l1[i]:.1f}\n{score_name} {anomaly_index[i]:.2f}",
            fontsize=7,
            color=colour,
        )
        for row in (0, 1):
            axes[row][col].set_xticks([])
            axes[row][col].set_yticks([])
    axes[0][0].set_ylabel("mask", fontsize=8)
    axes[1][0].set_ylabel("mask x pattern", fontsize=8)
    fig.suptitle(title, fontsize=9, y=1.1)
    return save(fig, path)


def plot_label_heatmaps(
    heatmaps: Tensor,
    labels: Sequence[int],
    anomaly_index: Sequence[float],
    flagged: Sequence[int],
    path: Path,
    max_labels: int = 20,
) -> Path:
    """One panel per label (the `max_labels` largest anomaly indices first): the label's mean
    saliency heatmap [H, W], titled with the label and its anomaly index, red when flagged."""
    order = sorted(range(len(labels)), key=lambda i: -anomaly_index[i])[:max_labels]
    columns = max(len(order), 1)
    fig, axes = figure(nrows=1, ncols=columns, figsize=(1.3 * columns + 0.6, 1.9), squeeze=False)
    for col, i in enumerate(order):
        axis = axes[0][col]
        axis.imshow(heatmaps[i].detach().float().cpu(), cmap="inferno")
        colour = "red" if labels[i] in flagged else "black"
        axis.set_title(f"{labels[i]}\nAI {anomaly_index[i]:.2f}", fontsize=7, color=colour)
        axis.set_xticks([])
        axis.set_yticks([])
    fig.suptitle(
        "NeuronInspect mean saliency per label (largest anomaly index first; red = flagged)",
        fontsize=9,
        y=1.15,
    )
    return save(fig, path)


def save_triggers(masks: Tensor, patterns: Tensor, labels: Tensor, l1: Tensor, path: Path) -> Path:
    """The reversed triggers as a safetensors file (no pickle), written atomically."""
    from safetensors.torch import save_file

    tensors = {
        "masks": masks.float().contiguous(),
        "patterns": patterns.float().contiguous(),
        "labels": labels.long().contiguous(),
        "l1": l1.double().contiguous(),
    }
    with atomic_file(path) as tmp:
        save_file({k: torch.as_tensor(v) for k, v in tensors.items()}, str(tmp))
    return path
