"""Activation clustering: split every class's last-hidden-layer activations in two and drop the
cluster that looks poisoned.

Chen et al., "Detecting Backdoor Attacks on Deep Neural Networks by Activation Clustering",
SafeAI @ AAAI 2019 (arXiv 1811.03728), and IBM ART's ActivationDefence (the authors' code):
activations of the poisoned model, segmented by label, reduced to 10 dimensions (ICA in the
paper), 2-means; the runner then retrains on the kept samples. scikit-learn does the work.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import Tensor, nn

from bdrun.data.base import ImageSet
from bdrun.defenses.base import Defense
from bdrun.errors import BdrunError
from bdrun.models.probes import penultimate
from bdrun.rng import derive_seed

if TYPE_CHECKING:
    from bdrun.context import RunContext
    from bdrun.state import RunData

log = logging.getLogger(__name__)

REDUCTIONS = ("pca", "ica")
ANALYSES = ("holdout", "size", "silhouette", "smaller")


@dataclass
class ClassClusters:
    """One label's clustering: its rows of the training set, their clusters, the flagged ones."""

    label: int
    rows: np.ndarray
    assigned: np.ndarray
    flagged: list[int]


class ActivationClustering(Defense):
    """Per class: reduce, 2-means, flag clusters by `analysis`, remove them before retraining.

    Parameters:
        reduce: "pca" (default) or "ica" (FastICA, the paper's and ART's choice); on
            Fashion-MNIST BadNets, PCA separates the poisoned cluster more cleanly.
        dims: dimensions kept (10, paper and ART).
        clusters: k of k-means (2, paper and ART).
        analysis: which clusters count as poisoned.
            "size": a cluster holding less than `size_threshold` of its class (Chen et al.'s
                relative size; ART's 0.35);
            "silhouette": the smaller cluster of a class whose silhouette score exceeds
                `silhouette_threshold` (two real groups; ART's 0.1);
            "smaller": the smaller cluster of every class (ART's default analysis);
            "holdout" (default): a group clean data does not fall into. A cluster holding a
                share s of the class's training samples is flagged when it receives fewer than
                `holdout_ratio` * s of the class's clean holdout samples and so few that a
                binomial(n_holdout, s) count would be that low with probability under
                `holdout_alpha` (no false alarms from a handful of holdout samples). Classes
                with fewer than `min_holdout_per_class` holdout samples fall back to "size".
                Size tests cannot tell which half is poisoned when poisons make up half of the
                target class (BadNets at 10 % of all samples); the clean holdout can.
        silhouette_sample: samples the silhouette score is computed on (it is quadratic).
    """

    name = "activation_clustering"
    analyses: tuple[str, ...] = ANALYSES
    seed_stream = "activation-clustering"

    def __init__(
        self,
        reduce: str,
        dims: int,
        clusters: int,
        analysis: str,
        size_threshold: float,
        silhouette_threshold: float,
        holdout_ratio: float,
        holdout_alpha: float,
        min_holdout_per_class: int,
        silhouette_sample: int,
    ) -> None:
        if reduce not in REDUCTIONS:
            raise BdrunError(f"defense.reduce={reduce!r} must be one of {', '.join(REDUCTIONS)}")
        if analysis not in self.analyses:
            raise BdrunError(
                f"defense.analysis={analysis!r} must be one of {', '.join(self.analyses)}"
            )
        if int(dims) < 1 or int(clusters) < 2:
            raise BdrunError(
                f"defense.dims={dims} must be >= 1 and defense.clusters={clusters} >= 2"
            )
        self.reduce = reduce
        self.dims = int(dims)
        self.clusters = int(clusters)
        self.analysis = analysis
        self.size_threshold = float(size_threshold)
        self.silhouette_threshold = float(silhouette_threshold)
        self.holdout_ratio = float(holdout_ratio)
        self.holdout_alpha = float(holdout_alpha)
        self.min_holdout_per_class = int(min_holdout_per_class)
        self.silhouette_sample = int(silhouette_sample)

    def _reducer(self, dims: int, seed: int) -> Any:
        from sklearn.decomposition import PCA, FastICA

        if self.reduce == "pca":
            return PCA(n_components=dims, random_state=seed)
        return FastICA(n_components=dims, whiten="unit-variance", max_iter=1000, random_state=seed)

    def _flag(
        self,
        reduced: np.ndarray,
        assigned: np.ndarray,
        holdout_assigned: np.ndarray,
        seed: int,
        features: np.ndarray | None = None,
    ) -> list[int]:
        """The clusters of one class judged poisoned (`features`: the class's unreduced
        representation, for analyses of subclasses that need it)."""
        from sklearn.metrics import silhouette_score

        sizes = np.bincount(assigned, minlength=self.clusters) / len(assigned)
        analysis = self.analysis
        if analysis == "holdout" and len(holdout_assigned) < self.min_holdout_per_class:
            analysis = "size"
        if analysis == "holdout":
            from scipy.stats import binom

            n_clean = len(holdout_assigned)
            clean_counts = np.bincount(holdout_assigned, minlength=self.clusters)
            return [
                k
                for k in range(self.clusters)
                if clean_counts[k] < self.holdout_ratio * sizes[k] * n_clean
                and binom.cdf(clean_counts[k], n_clean, sizes[k]) < self.holdout_alpha
            ]
        if analysis == "size":
            return [k for k in range(self.clusters) if sizes[k] < self.size_threshold]
        smaller = int(sizes.argmin())
        if analysis == "smaller":
            return [smaller]
        if len(np.unique(assigned)) < 2:
            return []
        sample = min(self.silhouette_sample, len(reduced))
        score = silhouette_score(reduced, assigned, sample_size=sample, random_state=seed)
        return [smaller] if score > self.silhouette_threshold else []

    def representation(self, model: nn.Module, images: ImageSet, ctx: RunContext) -> np.ndarray:
        """[N, D] what gets clustered: the last hidden layer's activations."""
        batch = ctx.settings.eval_batch_size
        return penultimate(model, images.x, batch, ctx.device).double().numpy()

    def cluster_classes(
        self,
        feats: np.ndarray,
        labels: np.ndarray,
        reference: np.ndarray,
        reference_labels: np.ndarray,
        seed: int,
    ) -> tuple[np.ndarray, list[ClassClusters]]:
        """Per label: reduce, k-means, flag. Returns the removal mask over the rows of `feats`
        and every clustered class's rows, cluster assignment and flagged clusters.
        `reference` (clean holdout representations) feeds the holdout analysis."""
        from sklearn.cluster import KMeans

        removed = np.zeros(len(feats), dtype=bool)
        classes = []
        for label in np.unique(labels):
            rows = np.flatnonzero(labels == label)
            dims = min(self.dims, feats.shape[1], len(rows) - 1)
            if len(rows) <= self.clusters or dims < 1:
                continue
            reducer = self._reducer(dims, seed)
            reduced = reducer.fit_transform(feats[rows])
            kmeans = KMeans(self.clusters, n_init=10, random_state=seed).fit(reduced)
            clean = reference[reference_labels == label]
            holdout_assigned = (
                kmeans.predict(reducer.transform(clean)) if len(clean) else np.zeros(0, dtype=int)
            )
            flagged = self._flag(reduced, kmeans.labels_, holdout_assigned, seed, feats[rows])
            removed[rows[np.isin(kmeans.labels_, flagged)]] = True
            classes.append(ClassClusters(int(label), rows, kmeans.labels_, flagged))
        return removed, classes

    def inspect_data(self, model: nn.Module, data: RunData, ctx: RunContext) -> Tensor:
        train, holdout = data.train, data.holdout
        feats = self.representation(model, train, ctx)
        reference = self.representation(model, holdout, ctx)
        seed = derive_seed(ctx.seed, self.seed_stream) % (2**31 - 1)
        removed, classes = self.cluster_classes(
            feats, train.y.numpy(), reference, holdout.y.numpy(), seed
        )
        log.info("%s removed %d samples", self.name, int(removed.sum()))
        self.describe(feats, classes, ctx)
        return ~torch.from_numpy(removed)

    def describe(self, feats: np.ndarray, classes: list[ClassClusters], ctx: RunContext) -> None:
        """Figures of the clusters, for subclasses (activation clustering draws none)."""
