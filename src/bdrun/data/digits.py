"""scikit-learn's bundled handwritten digits: 1,797 grey 8x8 images, 10 classes, offline."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import torch

from bdrun.data.base import ImageSet, SourceData
from bdrun.errors import BdrunError
from bdrun.rng import generator


def digits_arrays() -> tuple[np.ndarray, np.ndarray]:
    """(images [1797, 8, 8] float 0..16, labels [1797]): sklearn.datasets.load_digits's data,
    read from the file scikit-learn ships (data/digits.csv.gz: 64 pixels and the label per row)
    without importing scikit-learn, which costs a second at every start; load_digits where the
    file is not where this version keeps it."""
    spec = importlib.util.find_spec("sklearn")
    folders = spec.submodule_search_locations if spec is not None else None
    path = Path(folders[0]) / "datasets" / "data" / "digits.csv.gz" if folders else None
    if path is None or not path.is_file():
        from sklearn.datasets import load_digits

        bunch = load_digits()
        return bunch.images, bunch.target
    rows = np.loadtxt(path, delimiter=",")
    return rows[:, :-1].reshape(-1, 8, 8), rows[:, -1].astype(int)


class Digits:
    """The UCI optical digits bundled with scikit-learn, split into train and test here.

    The set has no official test split, so `test_fraction` of it (drawn with `split_seed`,
    fixed so every run sees the same test set) becomes the test split.
    """

    def __init__(self, test_fraction: float = 0.3, split_seed: int = 0) -> None:
        if not 0 < test_fraction < 1:
            raise BdrunError(f"dataset.source.test_fraction={test_fraction} must be in (0, 1)")
        self.test_fraction = test_fraction
        self.split_seed = split_seed

    def load(self) -> SourceData:
        images, target = digits_arrays()
        # pixel values are 0..16; scale to uint8 like every other image source
        x = torch.from_numpy(images).mul(255.0 / 16.0).round().to(torch.uint8)
        x = x.unsqueeze(1)
        y = torch.from_numpy(target).long()
        order = torch.randperm(len(y), generator=generator(self.split_seed, "digits-split"))
        n_test = round(len(y) * self.test_fraction)
        test_idx, train_idx = order[:n_test], order[n_test:]
        return SourceData(
            train=ImageSet(x[train_idx], y[train_idx]),
            test=ImageSet(x[test_idx], y[test_idx]),
            num_classes=10,
            class_names=tuple(str(i) for i in range(10)),
        )
