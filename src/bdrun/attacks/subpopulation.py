"""Subpopulation poisoning (Jagielski et al. 2021): label flips aimed at one natural subgroup."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import Tensor, nn

from bdrun.attacks.base import Attack
from bdrun.data.base import DataInfo, ImageSet, to_float
from bdrun.errors import BdrunError
from bdrun.metrics import accuracy, logits_of, predict
from bdrun.models.probes import penultimate
from bdrun.rng import derive_seed

if TYPE_CHECKING:
    from bdrun.context import RunContext
    from bdrun.state import RunData

METHODS = ("cluster", "feature")
FEATURES = ("label", "brightness")


class ClusterMap:
    """PCA to `pca_dim` then k-means (scikit-learn), fitted on one set, applied to others."""

    def __init__(self, clusters: int, pca_dim: int, seed: int) -> None:
        self.clusters, self.pca_dim, self.seed = clusters, pca_dim, seed

    def fit(self, features: Tensor) -> Tensor:
        from sklearn.cluster import KMeans
        from sklearn.decomposition import PCA

        data = features.numpy().astype(np.float64)
        dims = min(self.pca_dim, data.shape[1], len(data))
        self.pca = PCA(n_components=dims, random_state=self.seed % 2**32).fit(data)
        self.kmeans = KMeans(n_clusters=self.clusters, n_init=10, random_state=self.seed % 2**32)
        return torch.from_numpy(self.kmeans.fit_predict(self.pca.transform(data))).long()

    def __call__(self, features: Tensor) -> Tensor:
        reduced = self.pca.transform(features.numpy().astype(np.float64))
        return torch.from_numpy(self.kmeans.predict(reduced)).long()


class Subpopulation(Attack):
    """Label-flipping poison that targets one subpopulation while sparing the rest.

    Jagielski, Severi, Pousette Harger and Oprea 2021 ("Subpopulation Data Poisoning Attacks").
    The subpopulation is found with
    - ClusterMatch (method=cluster): the attacker's clean model maps every image to its
      penultimate representation, PCA reduces it to `pca_dim` dimensions and k-means splits it
      into `clusters` clusters; one cluster is the subpopulation (train and test members are
      those k-means assigns to it). Defaults as the authors' code: 100 clusters, PCA to 10.
    - FeatureMatch (method=feature): the samples whose annotated features match `match`; images
      carry no annotations here, so the features are the class `label` and `brightness`, the
      quantile bin (of `bins`) of the mean pixel value, e.g. match {label: 0, brightness: 0} =
      the darkest quarter of class 0.
    The poison relabels training samples of the subpopulation with the class the clean model
    finds least likely on the subpopulation (the authors' "worst class": smallest summed
    softmax). The authors add copies of auxiliary-data points (poison size alpha times the
    subpopulation); bdrun flips labels in place, poisoning `fraction` of the subpopulation's
    training samples (those not already of the flip class). The attack's poison rate is that
    count over the training set. The clean model is the cached "surrogate" (the configured
    architecture trained on the clean training set), which is also the reference for damage.

    The backdoor test set is the test subpopulation (minus samples of the flip class) labelled
    with the flip class: ASR = share moved to the flip class, RA = share still right.
    `evaluate` reports the paper's figures: target_damage = clean model's accuracy on the test
    subpopulation minus the evaluated model's; collateral_damage = the same on the rest of the
    test set; plus subpop_size_train / subpop_size_test.

    Parameters:
        method: 'cluster' (ClusterMatch) or 'feature' (FeatureMatch).
        cluster: which cluster; null = a seeded random one with members in train and test.
        fraction: share of the subpopulation's eligible training samples relabelled, (0, 1].
    """

    name = "subpopulation"
    stamps_inputs = False  # the subpopulation itself is the key

    def __init__(
        self,
        method: str,
        clusters: int,
        pca_dim: int,
        cluster: int | None,
        match: Mapping[str, int] | None,
        bins: int,
        fraction: float,
    ) -> None:
        # the target (the clean model's worst class) and the poison rate (the subpopulation's
        # share of the training set) are chosen in fit; these stand in until then
        super().__init__(target=0, poison_rate=1.0, label_mode="all2one")
        self.method = method
        self.clusters = int(clusters)
        self.pca_dim = int(pca_dim)
        self.cluster = cluster
        self.match = dict(match or {})
        self.bins = int(bins)
        self.fraction = float(fraction)

    def setup(self, info: DataInfo, seed: int) -> None:
        super().setup(info, seed)
        self.seed = seed
        if self.method not in METHODS:
            raise BdrunError(f"attack.method={self.method!r} must be one of {', '.join(METHODS)}")
        if not 0 < self.fraction <= 1:
            raise BdrunError(f"attack.fraction={self.fraction} must be in (0, 1]")
        if self.method == "cluster" and (self.clusters < 2 or self.pca_dim < 1):
            raise BdrunError("attack.clusters must be >= 2 and attack.pca_dim >= 1")
        if self.method == "feature":
            unknown = sorted(set(self.match) - set(FEATURES))
            if not self.match or unknown:
                raise BdrunError(
                    f"attack.match={self.match} must map some of {', '.join(FEATURES)} to values"
                )
            if self.bins < 1:
                raise BdrunError(f"attack.bins={self.bins} must be >= 1")

    # -- the subpopulation -------------------------------------------------------------------
    def brightness_bins(self, x: Tensor, edges: Tensor) -> Tensor:
        return torch.bucketize(to_float(x).flatten(1).mean(1), edges)

    def feature_members(self, train: ImageSet, test: ImageSet) -> tuple[Tensor, Tensor]:
        """FeatureMatch: members of train and test matching every feature in `match`."""
        brightness = to_float(train.x).flatten(1).mean(1)
        edges = torch.quantile(brightness, torch.linspace(0, 1, self.bins + 1)[1:-1])
        members = []
        for data in (train, test):
            keep = torch.ones(len(data), dtype=torch.bool)
            if "label" in self.match:
                keep &= data.y == int(self.match["label"])
            if "brightness" in self.match:
                keep &= self.brightness_bins(data.x, edges) == int(self.match["brightness"])
            members.append(keep)
        return members[0], members[1]

    def cluster_members(
        self, model: nn.Module, train: ImageSet, test: ImageSet, ctx: RunContext
    ) -> tuple[Tensor, Tensor]:
        """ClusterMatch: k-means clusters of the clean model's representations."""
        batch, device = ctx.settings.eval_batch_size, ctx.device
        if self.clusters > len(train):
            raise BdrunError(
                f"attack.clusters={self.clusters} exceeds the {len(train)} training samples"
            )
        mapping = ClusterMap(self.clusters, self.pca_dim, derive_seed(self.seed, "kmeans"))
        train_ids = mapping.fit(penultimate(model, train.x, batch, device))
        test_ids = mapping(penultimate(model, test.x, batch, device))
        chosen = self.cluster
        if chosen is None:
            usable = [
                c for c in range(self.clusters) if (train_ids == c).any() and (test_ids == c).any()
            ]
            g = ctx.generator("subpopulation-cluster")
            chosen = usable[int(torch.randint(len(usable), (1,), generator=g))]
        elif not 0 <= int(chosen) < self.clusters:
            raise BdrunError(f"attack.cluster={chosen} must be in 0..{self.clusters - 1} or null")
        self.chosen_cluster = int(chosen)
        return train_ids == self.chosen_cluster, test_ids == self.chosen_cluster

    def fit(self, clean_train: ImageSet, test: ImageSet, ctx: RunContext) -> None:
        """Find the subpopulation and its flip class with the attacker's clean model."""
        model, _ = ctx.train_cached(clean_train, stream="surrogate")
        if self.method == "cluster":
            self.train_members, self.test_members = self.cluster_members(
                model, clean_train, test, ctx
            )
        else:
            self.train_members, self.test_members = self.feature_members(clean_train, test)
        if not self.train_members.any() or not self.test_members.any():
            raise BdrunError(
                f"the subpopulation ({self.describe()}) has {int(self.train_members.sum())} "
                f"training and {int(self.test_members.sum())} test samples; pick another one"
            )
        batch, device = ctx.settings.eval_batch_size, ctx.device
        probs = logits_of(model.to(device), clean_train.x[self.train_members], batch, device)
        self.target = int(probs.softmax(1).sum(0).argmin())  # the authors' "worst class"
        eligible = int((self.train_members & (clean_train.y != self.target)).sum())
        self.poison_rate = round(self.fraction * eligible) / len(clean_train)
        # the clean model's accuracy inside / outside the subpopulation: the damage reference
        clean_preds = predict(model, test.x, batch, device)
        self._clean_accuracy = self.split_accuracy(clean_preds, test.y)
        model.cpu()

    def describe(self) -> str:
        if self.method == "cluster":
            return f"cluster {getattr(self, 'chosen_cluster', self.cluster)} of {self.clusters}"
        return f"features {self.match}"

    def split_accuracy(self, preds: Tensor, labels: Tensor) -> tuple[float, float]:
        """(accuracy on the test subpopulation, accuracy on the rest of the test set)."""
        inside = self.test_members
        return accuracy(preds[inside], labels[inside]), accuracy(preds[~inside], labels[~inside])

    # -- poisoning -------------------------------------------------------------------------------
    def eligible(self, y: Tensor) -> Tensor:
        if len(y) != len(self.train_members):
            raise BdrunError("the subpopulation attack poisons the training set it was fitted on")
        return self.train_members & (y != self.target)

    def apply_trigger(self, x: Tensor) -> Tensor:
        return x  # no trigger: membership in the subpopulation is what the attack keys on

    def backdoor_test(self, test: ImageSet) -> ImageSet:
        if not hasattr(self, "test_members"):
            raise RuntimeError("Subpopulation.fit(clean_train, test, ctx) must run first")
        keep = self.test_members & (test.y != self.target)
        subset = test.subset(keep)
        return subset.replace(
            y=torch.full_like(subset.y, self.target),
            poison=torch.ones(len(subset), dtype=torch.bool),
            orig_y=subset.y.clone(),
        )

    def evaluate(
        self, predict_fn: Callable[[Tensor], Tensor], data: RunData, ctx: RunContext
    ) -> dict[str, Any]:
        inside, outside = self.split_accuracy(predict_fn(data.test.x), data.test.y)
        clean_inside, clean_outside = self._clean_accuracy
        return {
            "target_damage": clean_inside - inside,
            "collateral_damage": clean_outside - outside,
            "subpop_size_train": int(self.train_members.sum()),
            "subpop_size_test": int(self.test_members.sum()),
        }
