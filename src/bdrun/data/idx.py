"""MNIST and Fashion-MNIST from IDX files: a local folder, Debian's package, or a mirror."""

from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np
import torch

from bdrun.data.base import ImageSet, SourceData
from bdrun.data.download import fetch
from bdrun.errors import BdrunError
from bdrun.finite import check_data

IDX_DTYPES = {0x08: np.uint8, 0x09: np.int8, 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}
FILES = {
    "train_images": "train-images-idx3-ubyte",
    "train_labels": "train-labels-idx1-ubyte",
    "test_images": "t10k-images-idx3-ubyte",
    "test_labels": "t10k-labels-idx1-ubyte",
}


def read_idx(path: Path) -> np.ndarray:
    """Parse an IDX file (optionally gzipped) into an array; malformed files are a BdrunError."""
    try:
        raw = gzip.decompress(path.read_bytes()) if path.suffix == ".gz" else path.read_bytes()
    except (OSError, EOFError, gzip.BadGzipFile) as err:
        raise BdrunError(f"cannot read {path}: {err}") from err
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] not in IDX_DTYPES:
        raise BdrunError(f"{path} is not an IDX file (bad magic number)")
    ndim = raw[3]
    header = 4 + 4 * ndim
    dims = [int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim)]
    dtype = np.dtype(IDX_DTYPES[raw[2]])
    expected = int(np.prod(dims)) * dtype.itemsize
    if len(raw) - header != expected:
        raise BdrunError(
            f"{path} is truncated or corrupt ({len(raw) - header} data bytes, expected {expected})"
        )
    values = np.frombuffer(raw, dtype=dtype, offset=header).reshape(dims)
    check_data(values, str(path))  # IDX may hold floats
    return values


class IdxSource:
    """An IDX image set (28x28 grey, 10 classes).

    Looks for the four files (plain or .gz) in `root`/<name>/ and then in `search`, and
    otherwise downloads the .gz files from `mirrors` into `root`/<name>/, checking each against
    `checksums` (MD5 of the .gz as the mirrors publish them). Files found locally are checked
    structurally instead (Debian recompresses them, so their MD5 differs).
    """

    name = "idx"
    mirrors_default: tuple[str, ...] = ()
    checksums_default: dict[str, str] = {}
    search_default: tuple[str, ...] = ()
    class_names: tuple[str, ...] = tuple(str(i) for i in range(10))

    def __init__(
        self,
        root: str = "~/.cache/bdrun/data",
        download: bool = True,
        mirrors: list[str] | None = None,
        checksums: dict[str, str] | None = None,
        search: list[str] | None = None,
        timeout: float = 60.0,
    ) -> None:
        self.folder = Path(root).expanduser() / self.name
        self.download = download
        self.mirrors = list(self.mirrors_default if mirrors is None else mirrors)
        self.checksums = dict(self.checksums_default if checksums is None else checksums)
        self.search = [Path(p) for p in (self.search_default if search is None else search)]
        self.timeout = timeout

    def _find(self, stem: str) -> Path | None:
        for folder in [self.folder, *self.search]:
            for candidate in (folder / stem, folder / f"{stem}.gz"):
                if candidate.is_file():
                    return candidate
        return None

    def _locate(self, stem: str) -> Path:
        found = self._find(stem)
        if found is not None:
            return found
        places = ", ".join(str(p) for p in [self.folder, *self.search])
        if not self.download:
            raise BdrunError(
                f"{stem}(.gz) not found in {places}; place the {self.name} IDX files there or set dataset.source.download=true"
            )
        filename = f"{stem}.gz"
        if filename not in self.checksums:
            raise BdrunError(f"no checksum configured for {filename}; set dataset.source.checksums")
        return fetch(filename, self.checksums[filename], self.mirrors, self.folder, self.timeout)

    def load(self) -> SourceData:
        arrays = {key: read_idx(self._locate(stem)) for key, stem in FILES.items()}
        splits = {}
        for split in ("train", "test"):
            images, labels = arrays[f"{split}_images"], arrays[f"{split}_labels"]
            if images.ndim != 3 or labels.ndim != 1 or len(images) != len(labels):
                raise BdrunError(
                    f"{self.name} {split} files disagree: images {images.shape}, labels {labels.shape}"
                )
            x = torch.from_numpy(images.astype(np.uint8)).unsqueeze(1)
            splits[split] = ImageSet(x, torch.from_numpy(labels.astype(np.int64)))
        return SourceData(
            train=splits["train"],
            test=splits["test"],
            num_classes=len(self.class_names),
            class_names=self.class_names,
        )


class MNIST(IdxSource):
    """LeCun et al.'s handwritten digits (60,000 train / 10,000 test)."""

    name = "mnist"
    mirrors_default = (
        "https://ossci-datasets.s3.amazonaws.com/mnist",
        "http://yann.lecun.com/exdb/mnist",
    )
    checksums_default = {
        "train-images-idx3-ubyte.gz": "f68b3c2dcbeaaa9fbdd348bbdeb94873",
        "train-labels-idx1-ubyte.gz": "d53e105ee54ea40749a09fcbcd1e9432",
        "t10k-images-idx3-ubyte.gz": "9fb629c4189551a2d022fa330f9573f3",
        "t10k-labels-idx1-ubyte.gz": "ec29112dd5afa0611ce80d1b7f02629c",
    }


class FashionMNIST(IdxSource):
    """Zalando's Fashion-MNIST (60,000 train / 10,000 test); Debian ships it offline."""

    name = "fashion_mnist"
    mirrors_default = ("http://fashion-mnist.s3-website.eu-central-1.amazonaws.com",)
    checksums_default = {
        "train-images-idx3-ubyte.gz": "8d4fb7e6c68d591d4c3dfef9ec88bf0d",
        "train-labels-idx1-ubyte.gz": "25c81989df183df01b3e8a0aad5dffbe",
        "t10k-images-idx3-ubyte.gz": "bef4ecab320f06d8554ea6380940ec79",
        "t10k-labels-idx1-ubyte.gz": "bb300cfdad3c16e7a12a480ee83cd310",
    }
    search_default = ("/usr/share/datasets/fashion-mnist",)  # apt-get install dataset-fashion-mnist
    class_names = (
        "t-shirt/top", "trouser", "pullover", "dress", "coat",
        "sandal", "shirt", "sneaker", "bag", "ankle boot",
    )  # fmt: skip
