"""Gradient clustering: cluster every class's input gradients in two and drop the cluster that
looks poisoned.

Chan & Ong, "Poison as a Cure: Detecting & Neutralizing Variable-Sized Backdoor Attacks in Deep
Neural Networks" (arXiv 1911.08040, 2019). A model trained on poisoned data answers a poisoned
sample through its trigger, so the gradient of the loss with respect to the input, taken for the
sample's training label on the poisoned model, concentrates on the trigger's pixels; clean
samples of the same label spread theirs over the object. The paper clusters these input
gradients per class (dimension reduction, then 2 clusters) to find the poisoned samples.
No code was published with the paper; the clustering pieces (PCA / FastICA to `dims`, k-means,
the cluster analyses) are activation clustering's (bdrun.defenses.activation_clustering, whose
choices follow Chen et al. and IBM ART), run on input gradients instead of activations.
The paper's later stages (a poison signal extracted from the gradients, augmenting the data with
it and relabelling the poisoned samples before retraining) are not implemented: bdrun removes
the flagged cluster and the runner retrains on the rest, as for the other data inspectors.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import nn

from bdrun.data.base import ImageSet
from bdrun.defenses.activation_clustering import ANALYSES, ActivationClustering, ClassClusters
from bdrun.defenses.pruning import copy_model
from bdrun.errors import BdrunError
from bdrun.models.probes import input_gradients
from bdrun.report.plots import figure, save
from bdrun.validate import fraction

if TYPE_CHECKING:
    from bdrun.context import RunContext

log = logging.getLogger(__name__)

FIGURE = "gradient_clustering_heatmaps.png"
MAX_FIGURE_CLASSES = 10
FEATURES = ("log", "abs", "signed")


def concentration(saliency: np.ndarray, area: float) -> float:
    """Share of a non-negative map's total mass that sits in its top `area` share of pixels."""
    flat = np.sort(saliency.ravel())[::-1]
    top = max(1, int(round(area * flat.size)))
    total = flat.sum()
    return float(flat[:top].sum() / total) if total > 0 else 0.0


class GradientClustering(ActivationClustering):
    """Per class: input gradients, reduce, 2-means, flag clusters by `analysis`, remove them
    before retraining.

    Parameters (besides activation clustering's `reduce`, `dims`, `clusters` and its analyses
    with their thresholds, which work on the reduced gradients here):
        features: what of each sample's gradient g is clustered.
            "log" (default): log |g| minus its mean over the pixels. A confidently fit sample
            (most poisons) has a gradient orders of magnitude smaller than a doubtful one, so
            raw gradients split by loss, not by pattern; the centred log is free of each
            sample's scale (a rescaling is a shift, which the centring removes) and keeps the
            orders of magnitude between pixels that mark the trigger. The gradients are taken
            in float64 for this: in float32 the smallest ones underflow.
            "abs": |g| / ||g|| (unit L2 norm); "signed": g / ||g||. On Fashion-MNIST BadNets
            "log" keeps the recall the other two lose (docs/defenses/gradient_clustering.md).
        analysis: "holdout" (default), "size", "silhouette", "smaller" as in activation
            clustering, or "concentration": the paper's cue, a cluster whose gradients gather
            in a small region. A cluster is flagged when its mean |gradient| map puts at least
            `concentration_ratio` times the share of its mass into the top
            `concentration_area` of pixels that the other cluster's map does.
        concentration_area: share of pixels for the "concentration" analysis (0.05: a 3x3
            trigger covers 1 % of a 28x28 image, 14 % of an 8x8 one).
        concentration_ratio: how much more concentrated the flagged cluster must be.
    """

    name = "gradient_clustering"
    analyses = (*ANALYSES, "concentration")
    seed_stream = "gradient-clustering"

    def __init__(
        self,
        features: str,
        concentration_area: float,
        concentration_ratio: float,
        **clustering: Any,
    ) -> None:
        super().__init__(**clustering)
        area = fraction(concentration_area, "defense.concentration_area")
        if not area or area >= 1:
            raise BdrunError(
                f"defense.concentration_area={concentration_area} must be in (0, 1), e.g. 0.05"
            )
        if float(concentration_ratio) < 1:
            raise BdrunError(
                f"defense.concentration_ratio={concentration_ratio} must be >= 1, e.g. 1.5"
            )
        if features not in FEATURES:
            raise BdrunError(f"defense.features={features!r} must be one of {', '.join(FEATURES)}")
        self.features = features
        self.concentration_area = area
        self.concentration_ratio = float(concentration_ratio)
        self._shape: tuple[int, ...] = ()

    def representation(self, model: nn.Module, images: ImageSet, ctx: RunContext) -> np.ndarray:
        precise = copy_model(model).double() if self.features == "log" else model
        grads = input_gradients(
            precise, images.x, images.y, batch_size=ctx.settings.eval_batch_size, device=ctx.device
        )
        self._shape = tuple(images.x.shape[1:])
        flat = grads.flatten(1)
        if self.features == "log":
            # 1e-300: a pixel no path reaches (exactly 0) sits far below the rest, not at -inf
            logs = flat.abs().clamp_min(1e-300).log()
            return (logs - logs.mean(1, keepdim=True)).numpy()
        unit = flat / flat.norm(dim=1, keepdim=True).clamp_min(torch.finfo(flat.dtype).tiny)
        return (unit.abs() if self.features == "abs" else unit).float().numpy()

    def saliency(self, feats: np.ndarray) -> np.ndarray:
        """Mean |gradient| of these rows, each row at its own scale, as an [H, W] map
        (channels summed)."""
        magnitude = np.exp(feats) if self.features == "log" else np.abs(feats)
        return magnitude.reshape(len(feats), *self._shape).mean(0).sum(0)

    def _flag(
        self,
        reduced: np.ndarray,
        assigned: np.ndarray,
        holdout_assigned: np.ndarray,
        seed: int,
        features: np.ndarray | None = None,
    ) -> list[int]:
        if self.analysis != "concentration":
            return super()._flag(reduced, assigned, holdout_assigned, seed, features)
        assert features is not None
        shares = [
            concentration(self.saliency(features[assigned == k]), self.concentration_area)
            if (assigned == k).any()
            else 0.0
            for k in range(self.clusters)
        ]
        return [
            k
            for k in range(self.clusters)
            if all(
                shares[k] >= self.concentration_ratio * shares[j]
                for j in range(self.clusters)
                if j != k
            )
        ]

    def describe(self, feats: np.ndarray, classes: list[ClassClusters], ctx: RunContext) -> None:
        """Mean |input gradient| of each flagged cluster beside the rest of its class (PNG)."""
        flagged = [c for c in classes if c.flagged][:MAX_FIGURE_CLASSES]
        ctx.record(flagged_classes=[c.label for c in classes if c.flagged])
        if not flagged:
            return
        fig, axes = figure(
            nrows=len(flagged), ncols=2, figsize=(4.0, 2.0 * len(flagged)), squeeze=False
        )
        for row, cls in enumerate(flagged):
            in_flagged = np.isin(cls.assigned, cls.flagged)
            for col, (members, title) in enumerate(
                [(in_flagged, "flagged cluster"), (~in_flagged, "rest of the class")]
            ):
                ax = axes[row][col]
                ax.set_xticks([])
                ax.set_yticks([])
                ax.set_title(f"label {cls.label}: {title} ({int(members.sum())})", fontsize=7)
                if members.any():
                    ax.imshow(self.saliency(feats[cls.rows[members]]), cmap="hot")
        fig.suptitle("mean |input gradient|", fontsize=8)
        path = save(fig, ctx.run_dir / FIGURE)
        ctx.logger.log_image(f"{self.name}/heatmaps", path)
