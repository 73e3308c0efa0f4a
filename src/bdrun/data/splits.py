"""From a dataset config to train / test / clean-holdout splits and the data's description."""

from __future__ import annotations

from typing import Any

import torch

from bdrun.data.base import DataInfo, ImageSet, SourceData, Splits
from bdrun.errors import BdrunError
from bdrun.rng import generator


def _check_limit(limit: int | None) -> None:
    if limit is not None and limit < 1:
        raise BdrunError(f"subset size {limit} must be >= 1")


def split_holdout(
    train: ImageSet, fraction: float, g: torch.Generator
) -> tuple[ImageSet, ImageSet]:
    """Move `fraction` of `train` (at random) into a clean holdout the attacker never touches."""
    if not 0 <= fraction < 1:
        raise BdrunError(f"dataset.holdout_fraction={fraction} must be in [0, 1)")
    n_holdout = round(len(train) * fraction)
    order = torch.randperm(len(train), generator=g)
    return train.subset(order[n_holdout:].sort().values), train.subset(
        order[:n_holdout].sort().values
    )


def build_splits(
    raw: SourceData,
    name: str,
    seed: int,
    holdout_fraction: float = 0.1,
    max_train: int | None = None,
    max_test: int | None = None,
    max_holdout: int | None = None,
    mean: list[float] | None = None,
    std: list[float] | None = None,
) -> Splits:
    """Split off the holdout (unless the source brought one), cap sizes, describe the data.

    The holdout comes out of the training split before any cap, so `max_train` (smoke runs)
    never changes which samples defenders get; the capped training set keeps every label's
    share (ImageSet.stratified_subset), the capped test and holdout sets are plain random draws.
    """
    if raw.holdout is not None:
        train, holdout = raw.train, raw.holdout
    else:
        train, holdout = split_holdout(raw.train, holdout_fraction, generator(seed, "holdout"))
    for limit in (max_train, max_test, max_holdout):
        _check_limit(limit)
    # each label keeps its share of the capped training set, so an attack whose poison rate
    # fits the target class of the full set fits it in a smoke slice too (clean-label SIG)
    train = train.stratified_subset(max_train, generator(seed, "max_train"))
    test = raw.test.random_subset(max_test, generator(seed, "max_test"))
    holdout = holdout.random_subset(max_holdout, generator(seed, "max_holdout"))
    if len(train) == 0 or len(test) == 0:
        raise BdrunError(f"dataset {name} has an empty train or test split")
    shape = train.shape
    if test.shape != shape:
        raise BdrunError(
            f"dataset {name}: train images are {shape} but test images are {test.shape}"
        )
    for label, values in (("mean", mean), ("std", std)):
        if values is not None and len(values) != shape[0]:
            raise BdrunError(f"dataset.{label} has {len(values)} values for {shape[0]} channels")
    if std is not None and min(std) <= 0:
        raise BdrunError(f"dataset.std={list(std)} must be positive")
    info = DataInfo(
        name=name,
        shape=shape,
        num_classes=raw.num_classes,
        mean=tuple(mean) if mean is not None else None,
        std=tuple(std) if std is not None else None,
        class_names=raw.class_names,
    )
    return Splits(train=train, test=test, holdout=holdout, info=info)


def load_splits(dataset_cfg: Any, seed: int) -> Splits:
    """Instantiate the configured source, load it and split it for a run seeded with `seed`."""
    from hydra.utils import instantiate

    source = instantiate(dataset_cfg.source)
    raw = source.load()
    return build_splits(
        raw,
        name=dataset_cfg.name,
        seed=seed,
        holdout_fraction=dataset_cfg.get("holdout_fraction", 0.1),
        max_train=dataset_cfg.get("max_train"),
        max_test=dataset_cfg.get("max_test"),
        max_holdout=dataset_cfg.get("max_holdout"),
        mean=dataset_cfg.get("mean"),
        std=dataset_cfg.get("std"),
    )
