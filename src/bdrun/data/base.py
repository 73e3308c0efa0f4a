"""In-memory image sets that carry their ground truth through every pipeline stage."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor


def to_float(x: Tensor) -> Tensor:
    """Images as float32 in [0, 1] (uint8 is scaled by 1/255; float passes through)."""
    if x.dtype == torch.uint8:
        return x.float().div_(255.0)
    return x.float()


def to_storage(x: Tensor, like: Tensor) -> Tensor:
    """Float images back to the storage dtype of `like` (uint8 rounds, as a saved image would)."""
    if like.dtype == torch.uint8:
        return x.mul(255.0).round_().clamp_(0, 255).to(torch.uint8)
    return x.to(like.dtype)


@dataclass
class ImageSet:
    """Images [N, C, H, W] (uint8 0..255 or float) with per-sample ground truth.

    `y` is the label used for training and scoring, `orig_y` the true label before any attack
    relabelled it, `poison` marks samples an attack changed, and `index` is each sample's
    position in its source split, kept through subsetting so filters can be scored.
    """

    x: Tensor
    y: Tensor
    index: Tensor = field(default=None)  # type: ignore[assignment]
    poison: Tensor = field(default=None)  # type: ignore[assignment]
    orig_y: Tensor = field(default=None)  # type: ignore[assignment]

    def __post_init__(self) -> None:
        n = len(self.x)
        if len(self.y) != n:
            raise ValueError(f"{n} images but {len(self.y)} labels")
        self.y = self.y.long()
        if self.index is None:
            self.index = torch.arange(n)
        if self.poison is None:
            self.poison = torch.zeros(n, dtype=torch.bool)
        if self.orig_y is None:
            self.orig_y = self.y.clone()

    def __len__(self) -> int:
        return len(self.x)

    def subset(self, selector: Tensor) -> ImageSet:
        """The samples picked by a bool mask or an index tensor, ground truth included."""
        return ImageSet(
            self.x[selector],
            self.y[selector],
            self.index[selector],
            self.poison[selector],
            self.orig_y[selector],
        )

    def random_subset(self, limit: int | None, g: torch.Generator) -> ImageSet:
        """At most `limit` samples drawn with g, in their original order (all of them when
        limit is None or not below the size)."""
        if limit is None or limit >= len(self):
            return self
        return self.subset(torch.randperm(len(self), generator=g)[:limit].sort().values)

    def stratified_subset(self, limit: int | None, g: torch.Generator) -> ImageSet:
        """At most `limit` samples drawn with g so that each label keeps its share of the set
        (largest remainders round the counts to `limit`), in their original order; all of them
        when limit is None or not below the size."""
        if limit is None or limit >= len(self):
            return self
        labels, counts = self.y.unique(return_counts=True)
        exact = counts.double() * limit / len(self)
        take = exact.floor().long()
        short = limit - int(take.sum())
        take[torch.argsort(exact - take, descending=True, stable=True)[:short]] += 1
        order = torch.randperm(len(self), generator=g)
        chosen = [order[self.y[order] == label][:n] for label, n in zip(labels, take, strict=True)]
        return self.subset(torch.cat(chosen).sort().values)

    def replace(self, **changes: Tensor) -> ImageSet:
        """A copy with some fields replaced (tensors not replaced are shared, not copied)."""
        fields = {
            "x": self.x,
            "y": self.y,
            "index": self.index,
            "poison": self.poison,
            "orig_y": self.orig_y,
        }
        fields.update(changes)
        return ImageSet(**fields)

    @staticmethod
    def concat(parts: list[ImageSet]) -> ImageSet:
        """The parts one after another, ground truth included."""
        return ImageSet(
            torch.cat([p.x for p in parts]),
            torch.cat([p.y for p in parts]),
            torch.cat([p.index for p in parts]),
            torch.cat([p.poison for p in parts]),
            torch.cat([p.orig_y for p in parts]),
        )

    @property
    def shape(self) -> tuple[int, int, int]:
        return tuple(self.x.shape[1:])  # type: ignore[return-value]


@dataclass(frozen=True)
class DataInfo:
    """What models and attacks need to know about a data set."""

    name: str
    shape: tuple[int, int, int]  # (C, H, W)
    num_classes: int
    mean: tuple[float, ...] | None = None  # per-channel normalisation applied inside the model
    std: tuple[float, ...] | None = None
    class_names: tuple[str, ...] | None = None


@dataclass
class Splits:
    """Train (what the attacker may poison), test, and a clean holdout kept for defenders."""

    train: ImageSet
    test: ImageSet
    holdout: ImageSet
    info: DataInfo


@dataclass
class SourceData:
    """What a data source returns: its official splits, before bdrun's holdout split.

    `holdout` is set only by sources that ship a separate clean set for defenders (CSAW's
    clean validation data); otherwise the holdout is carved out of `train`.
    """

    train: ImageSet
    test: ImageSet
    num_classes: int
    class_names: tuple[str, ...] | None = None
    holdout: ImageSet | None = None
