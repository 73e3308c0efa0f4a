"""Images and labels from HDF5 files (CSAW-HackML layout: datasets `data` and `label`)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from bdrun.data.base import ImageSet, SourceData
from bdrun.errors import BdrunError
from bdrun.finite import check_data

CHANNEL_SIZES = (1, 3)


def to_nchw(x: np.ndarray, layout: str, path: Path) -> np.ndarray:
    """(N,C,H,W), (N,H,W,C) or (N,H,W) images as (N,C,H,W); `layout` is nchw, nhwc or auto."""
    if x.ndim == 3:
        return x[:, None]
    if x.ndim != 4:
        raise BdrunError(
            f"{path}: images have shape {x.shape}; expected (N,C,H,W), (N,H,W,C) or (N,H,W)"
        )
    if layout == "auto":
        # a trailing 1 or 3 means channels-last (CSAW ships (N,55,47,3)); otherwise channels-first
        layout = "nhwc" if x.shape[3] in CHANNEL_SIZES else "nchw"
    if layout == "nhwc":
        x = x.transpose(0, 3, 1, 2)
    elif layout != "nchw":
        raise BdrunError(f"dataset.source.layout={layout!r} must be auto, nchw or nhwc")
    if x.shape[1] not in CHANNEL_SIZES:
        raise BdrunError(
            f"{path}: {x.shape[1]} channels after reading as {layout}; set dataset.source.layout"
        )
    return np.ascontiguousarray(x)


def read_h5(
    path: str | Path,
    x_key: str = "data",
    y_key: str = "label",
    layout: str = "auto",
    divide_by: float | None = 255.0,
) -> ImageSet:
    """Read one HDF5 file into a float32 ImageSet with pixel values in [0, 1].

    `divide_by` maps stored values to [0, 1] (255 for CSAW's 0..255 floats; null when the file
    already holds [0, 1]). Labels may be stored as floats or as an (N, 1) column.
    """
    import h5py

    path = Path(path).expanduser()
    if not path.is_file():
        raise BdrunError(f"h5 file not found: {path}")
    try:
        with h5py.File(path, "r") as f:
            missing = [k for k in (x_key, y_key) if k not in f]
            if missing:
                raise BdrunError(
                    f"{path} has no dataset {missing[0]!r} (it has: {', '.join(f.keys()) or 'nothing'}); "
                    "set dataset.source.x_key / y_key"
                )
            x = np.asarray(f[x_key], dtype=np.float32)
            y = np.asarray(f[y_key])
    except OSError as err:
        raise BdrunError(f"{path} is not a readable HDF5 file ({err})") from err
    check_data(x, f"{path}: {x_key!r}")
    y = y.reshape(len(y), -1)
    if y.shape[1] != 1:
        raise BdrunError(f"{path}: labels {y_key!r} have shape {y.shape}; expected (N,) or (N, 1)")
    y = y[:, 0]
    if len(x) != len(y):
        raise BdrunError(f"{path}: {len(x)} images but {len(y)} labels")
    if not np.all(np.equal(np.mod(y, 1), 0)) or (len(y) and y.min() < 0):
        raise BdrunError(f"{path}: labels {y_key!r} must be non-negative integers")
    x = to_nchw(x, layout, path)
    if divide_by:
        x /= divide_by
    if len(x) and (x.min() < -1e-6 or x.max() > 1 + 1e-6):
        raise BdrunError(
            f"{path}: pixel values span [{x.min():g}, {x.max():g}] after dividing by {divide_by}; "
            "set dataset.source.divide_by so they fall in [0, 1]"
        )
    return ImageSet(torch.from_numpy(x), torch.from_numpy(y.astype(np.int64)))


class H5Images:
    """A data set given as HDF5 files: train and test, and optionally a clean holdout for defenders.

    `num_classes` defaults to 1 + the largest label seen in any of the files.
    """

    def __init__(
        self,
        train_path: str,
        test_path: str,
        holdout_path: str | None = None,
        x_key: str = "data",
        y_key: str = "label",
        layout: str = "auto",
        divide_by: float | None = 255.0,
        num_classes: int | None = None,
    ) -> None:
        self.paths = {"train": train_path, "test": test_path, "holdout": holdout_path}
        self.read_args = {"x_key": x_key, "y_key": y_key, "layout": layout, "divide_by": divide_by}
        self.num_classes = num_classes

    def load(self) -> SourceData:
        if not self.paths["train"] or not self.paths["test"]:
            raise BdrunError(
                "dataset.source.train_path and dataset.source.test_path must be set for dataset=h5"
            )
        sets = {name: read_h5(path, **self.read_args) for name, path in self.paths.items() if path}
        shapes = {name: s.shape for name, s in sets.items()}
        if len(set(shapes.values())) > 1:
            raise BdrunError(f"h5 files disagree on image shape: {shapes}")
        seen = 1 + max(int(s.y.max()) for s in sets.values() if len(s))
        num_classes = self.num_classes or seen
        if seen > num_classes:
            raise BdrunError(
                f"labels go up to {seen - 1} but dataset.source.num_classes={num_classes}"
            )
        return SourceData(
            train=sets["train"],
            test=sets["test"],
            num_classes=num_classes,
            holdout=sets.get("holdout"),
        )
