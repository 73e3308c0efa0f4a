"""Data sources, splits and the in-memory loader."""

from __future__ import annotations

import gzip
import struct
import subprocess
import sys

import h5py
import numpy as np
import pytest
import torch

from bdrun.data.base import ImageSet, SourceData, to_float, to_storage
from bdrun.data.digits import Digits
from bdrun.data.fake import FakeImages
from bdrun.data.h5 import H5Images, read_h5
from bdrun.data.idx import FashionMNIST, read_idx
from bdrun.data.loader import InMemoryLoader
from bdrun.data.splits import build_splits, load_splits
from bdrun.errors import BdrunError

from conftest import compose_config


def write_idx(path, array: np.ndarray, gz: bool = True) -> None:
    header = struct.pack(">BBBB", 0, 0, 0x08, array.ndim) + b"".join(
        struct.pack(">I", d) for d in array.shape
    )
    payload = header + array.astype(np.uint8).tobytes()
    path.write_bytes(gzip.compress(payload) if gz else payload)


def write_idx_set(folder, n_train=30, n_test=10, seed=0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    arrays = {
        "train-images-idx3-ubyte": rng.integers(0, 256, (n_train, 28, 28)),
        "train-labels-idx1-ubyte": rng.integers(0, 10, n_train),
        "t10k-images-idx3-ubyte": rng.integers(0, 256, (n_test, 28, 28)),
        "t10k-labels-idx1-ubyte": rng.integers(0, 10, n_test),
    }
    folder.mkdir(parents=True, exist_ok=True)
    for stem, array in arrays.items():
        write_idx(folder / f"{stem}.gz", array)
    return arrays


def test_uint8_float_round_trip():
    x = torch.tensor([0, 1, 128, 255], dtype=torch.uint8)
    assert torch.equal(to_storage(to_float(x), like=x), x)
    assert to_float(x)[-1] == 1.0


def test_digits_source_is_the_bundled_set():
    raw = Digits(test_fraction=0.3).load()
    assert len(raw.train) + len(raw.test) == 1797
    assert raw.train.x.shape[1:] == (1, 8, 8) and raw.train.x.dtype == torch.uint8
    assert int(raw.train.x.max()) == 255 and raw.num_classes == 10
    # the source split is fixed: every run sees the same test set
    assert torch.equal(Digits(test_fraction=0.3).load().test.x, raw.test.x)


def test_fake_source_is_deterministic_and_shaped():
    a = FakeImages(shape=(3, 8, 8), num_classes=4, n_train=50, n_test=20).load()
    b = FakeImages(shape=(3, 8, 8), num_classes=4, n_train=50, n_test=20).load()
    assert torch.equal(a.train.x, b.train.x) and a.train.x.shape == (50, 3, 8, 8)
    assert int(a.train.y.max()) < 4


def test_holdout_is_disjoint_from_train_and_survives_max_train():
    raw = Digits().load()
    full = build_splits(raw, "digits", seed=0, holdout_fraction=0.1)
    capped = build_splits(raw, "digits", seed=0, holdout_fraction=0.1, max_train=100, max_test=50)
    assert len(full.holdout) == round(0.1 * len(raw.train))
    assert not set(full.holdout.index.tolist()) & set(full.train.index.tolist())
    assert len(full.train) + len(full.holdout) == len(raw.train)
    assert torch.equal(capped.holdout.index, full.holdout.index)
    assert len(capped.train) == 100 and len(capped.test) == 50
    assert set(capped.train.index.tolist()) <= set(full.train.index.tolist())
    other_seed = build_splits(raw, "digits", seed=1, holdout_fraction=0.1)
    assert not torch.equal(other_seed.holdout.index, full.holdout.index)


def test_a_capped_training_set_keeps_every_labels_share():
    y = torch.tensor([0] * 50 + [1] * 30 + [2] * 20)
    data = ImageSet(torch.arange(100).view(100, 1, 1, 1).float(), y)
    capped = data.stratified_subset(33, torch.Generator().manual_seed(0))
    # 16.5, 9.9 and 6.6 by share; the largest remainders round them to 33
    assert capped.y.bincount().tolist() == [16, 10, 7]
    assert torch.equal(capped.index, capped.index.sort().values)  # original order kept
    again = data.stratified_subset(33, torch.Generator().manual_seed(0))
    assert torch.equal(again.index, capped.index)
    assert data.stratified_subset(None, torch.Generator()) is data


def test_the_smoke_slice_holds_the_nines_the_sig_showcase_poisons():
    full = build_splits(Digits().load(), "digits", seed=0, holdout_fraction=0.1)
    smoke = build_splits(Digits().load(), "digits", seed=0, holdout_fraction=0.1, max_train=256)
    # conf/tuning/attack_dataset/sig_digits.yaml poisons 9 % of the training set, all nines
    assert int((full.train.y == 9).sum()) >= round(0.09 * len(full.train))
    assert int((smoke.train.y == 9).sum()) >= round(0.09 * len(smoke.train))


def test_split_arguments_are_validated():
    raw = Digits().load()
    with pytest.raises(BdrunError, match="holdout_fraction"):
        build_splits(raw, "digits", seed=0, holdout_fraction=1.0)
    with pytest.raises(BdrunError, match="dataset.std"):
        build_splits(raw, "digits", seed=0, mean=[0.5], std=[0.0])
    with pytest.raises(BdrunError, match="2 values for 1 channels"):
        build_splits(raw, "digits", seed=0, mean=[0.5, 0.5], std=[0.5, 0.5])


def test_source_holdout_is_used_as_is():
    train = ImageSet(torch.zeros(10, 1, 4, 4), torch.zeros(10))
    holdout = ImageSet(torch.ones(3, 1, 4, 4), torch.ones(3))
    splits = build_splits(SourceData(train, train, 2, holdout=holdout), "x", seed=0)
    assert len(splits.train) == 10 and torch.equal(splits.holdout.x, holdout.x)


def test_read_idx_plain_and_gz(tmp_path):
    array = np.arange(2 * 3 * 4).reshape(2, 3, 4)
    write_idx(tmp_path / "a.gz", array)
    write_idx(tmp_path / "a", array, gz=False)
    assert np.array_equal(read_idx(tmp_path / "a.gz"), array)
    assert np.array_equal(read_idx(tmp_path / "a"), array)


def test_read_idx_rejects_bad_files(tmp_path):
    (tmp_path / "bad").write_bytes(b"\x01\x02\x03\x04")
    with pytest.raises(BdrunError, match="bad magic"):
        read_idx(tmp_path / "bad")
    write_idx(tmp_path / "short", np.zeros((2, 3, 3)), gz=False)
    (tmp_path / "short").write_bytes((tmp_path / "short").read_bytes()[:-2])
    with pytest.raises(BdrunError, match="truncated"):
        read_idx(tmp_path / "short")


def test_idx_source_reads_files_found_in_root(tmp_path):
    arrays = write_idx_set(tmp_path / "fashion_mnist")
    raw = FashionMNIST(root=str(tmp_path), download=False, search=[]).load()
    assert raw.train.x.shape == (30, 1, 28, 28)
    assert np.array_equal(raw.train.x[:, 0].numpy(), arrays["train-images-idx3-ubyte"])
    assert np.array_equal(raw.test.y.numpy(), arrays["t10k-labels-idx1-ubyte"])


def test_idx_source_missing_files_without_download_is_a_clear_error(tmp_path):
    with pytest.raises(BdrunError, match="not found in .*set dataset.source.download=true"):
        FashionMNIST(root=str(tmp_path), download=False, search=[]).load()


def write_h5(path, x, y, x_key="data", y_key="label"):
    with h5py.File(path, "w") as f:
        f[x_key] = x
        f[y_key] = y


@pytest.mark.parametrize("layout", ["nhwc", "nchw"])
def test_h5_reads_both_layouts_and_divides_by_255(tmp_path, layout):
    rng = np.random.default_rng(0)
    nchw = rng.integers(0, 256, (6, 3, 5, 4)).astype(np.float32)
    stored = nchw.transpose(0, 2, 3, 1) if layout == "nhwc" else nchw
    write_h5(tmp_path / "d.h5", stored, np.arange(6, dtype=np.float64))
    data = read_h5(tmp_path / "d.h5")
    assert data.x.shape == (6, 3, 5, 4)
    assert torch.allclose(data.x, torch.from_numpy(nchw / 255.0))
    assert data.y.tolist() == list(range(6))


def test_h5_keys_are_configurable_and_labels_may_be_columns(tmp_path):
    write_h5(tmp_path / "d.h5", np.zeros((4, 8, 8, 1)), np.zeros((4, 1)), x_key="images", y_key="y")
    data = read_h5(tmp_path / "d.h5", x_key="images", y_key="y", divide_by=None)
    assert data.x.shape == (4, 1, 8, 8)


@pytest.mark.parametrize(
    "make, message",
    [
        (
            lambda p: write_h5(p, np.zeros((4, 8, 8, 3)), np.zeros(4), x_key="x"),
            "has no dataset 'data'",
        ),
        (lambda p: write_h5(p, np.zeros((4, 8, 8, 3)), np.zeros(5)), "4 images but 5 labels"),
        (lambda p: write_h5(p, np.zeros((4, 8, 8, 3)), np.full(4, 0.5)), "non-negative integers"),
        (
            lambda p: write_h5(p, np.zeros((4, 8, 8, 5)), np.zeros(4)),
            "8 channels after reading as nchw",
        ),
        (
            lambda p: write_h5(p, np.full((4, 8, 8, 3), 300.0), np.zeros(4)),
            "set dataset.source.divide_by",
        ),
        (lambda p: p.write_text("not hdf5"), "not a readable HDF5 file"),
    ],
)
def test_h5_bad_files_are_user_errors(tmp_path, make, message):
    make(tmp_path / "d.h5")
    with pytest.raises(BdrunError, match=message):
        read_h5(tmp_path / "d.h5")


def test_h5_missing_file_and_class_count(tmp_path):
    with pytest.raises(BdrunError, match="h5 file not found"):
        read_h5(tmp_path / "nope.h5")
    write_h5(tmp_path / "a.h5", np.zeros((4, 8, 8, 3)), np.array([0, 1, 2, 6]))
    raw = H5Images(str(tmp_path / "a.h5"), str(tmp_path / "a.h5")).load()
    assert raw.num_classes == 7
    with pytest.raises(BdrunError, match="labels go up to 6"):
        H5Images(str(tmp_path / "a.h5"), str(tmp_path / "a.h5"), num_classes=5).load()


def test_load_splits_from_config_for_the_h5_source(tmp_path):
    write_h5(
        tmp_path / "train.h5",
        np.random.default_rng(0).integers(0, 256, (40, 8, 8, 3)).astype(np.float32),
        np.arange(40) % 4,
    )
    write_h5(tmp_path / "test.h5", np.zeros((8, 8, 8, 3), np.float32), np.arange(8) % 4)
    cfg = compose_config(
        "dataset=h5",
        f"dataset.source.train_path={tmp_path / 'train.h5'}",
        f"dataset.source.test_path={tmp_path / 'test.h5'}",
    )
    splits = load_splits(cfg.dataset, seed=0)
    assert splits.info.shape == (3, 8, 8) and splits.info.num_classes == 4
    assert len(splits.train) == 36 and len(splits.holdout) == 4


def test_loader_covers_every_sample_once_per_epoch_and_reshuffles():
    data = ImageSet(torch.arange(10).view(10, 1, 1, 1).to(torch.uint8), torch.arange(10))
    loader = InMemoryLoader(data, batch_size=4, shuffle=True, seed=0)
    assert len(loader) == 3
    first = torch.cat([y for _, y, _ in loader])
    second = torch.cat([y for _, y, _ in loader])
    assert sorted(first.tolist()) == list(range(10)) and sorted(second.tolist()) == list(range(10))
    assert not torch.equal(first, second)
    x, y, pos = next(iter(InMemoryLoader(data, batch_size=4)))
    assert x.dtype == torch.uint8 and torch.equal(pos, torch.arange(4))


def test_loader_shards_disjointly_by_rank():
    data = ImageSet(torch.zeros(10, 1, 1, 1), torch.arange(10))
    seen = []
    for rank in range(2):
        loader = InMemoryLoader(data, batch_size=3, shuffle=True, seed=0, rank=rank, world_size=2)
        assert len(loader) == 2
        seen.append(torch.cat([y for _, y, _ in loader]).tolist())
    assert len(seen[0]) == len(seen[1]) == 5
    assert sorted(seen[0] + seen[1]) == list(range(10))


def test_digits_are_read_without_scikit_learn_and_match_load_digits():
    from sklearn.datasets import load_digits

    from bdrun.data.digits import digits_arrays

    images, target = digits_arrays()
    bunch = load_digits()
    assert np.array_equal(images, bunch.images) and np.array_equal(target, bunch.target)
    # a default run pays no scikit-learn import for its data
    probe = "from bdrun.data.digits import Digits; Digits().load(); import sys; print('sklearn' in sys.modules)"
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "False"
