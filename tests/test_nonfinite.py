"""NaN and inf never become results: data and weights holding them are refused when read, a
training whose loss or weights stop being finite ends in one error line (exit 2) naming the
stage, the epoch and the learning rate, and the model cache neither stores nor returns such a
model."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file
from test_keras import write_keras_h5
from torch import nn

from bdrun.attacks.triggers import load_image
from bdrun.cache import MODEL_FILE, ModelCache
from bdrun.data.idx import read_idx
from bdrun.errors import BdrunError, TrainingDiverged
from bdrun.eval_cli import read_h5_images
from bdrun.models.keras import read_keras_layers
from bdrun.runner import run

from conftest import attack_overrides, compose_config, run_bdrun


def cache_leftovers(cache: Path) -> list[str]:
    """What lies in the cache's models/ folder: entries, lock files, temporary folders (an empty
    checkpoint folder aside; a non-empty one is listed with its contents)."""
    models = cache / "models"
    if not models.exists():
        return []
    checkpoints = models / ".checkpoints"
    names = [p.name for p in models.iterdir() if p != checkpoints]
    names += [str(p.relative_to(models)) for p in checkpoints.rglob("*")]
    return sorted(names)


def run_folders(cwd: Path) -> list[Path]:
    outputs = cwd / "outputs"
    return [p for p in outputs.rglob("*") if p.is_dir()] if outputs.exists() else []


# -- trainings -------------------------------------------------------------------------------------


def test_a_diverging_training_ends_in_one_line_with_no_run_folder_and_no_cache_entry(tmp_path):
    cache = tmp_path / "cache"
    # debug=smoke (a small slice of digits) with the default 20 epochs
    proc = run_bdrun(
        "train.lr=1000",
        "debug=smoke",
        "train.epochs=20",
        "logger=none",
        cwd=tmp_path,
        env={"BDRUN_CACHE": str(cache)},
    )
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.strip().splitlines() == [
        "bdrun: error: training diverged: the loss became NaN in epoch 1 of 20 of the poisoned "
        "model's training (lr 1000); lower the learning rate"
    ]
    assert run_folders(tmp_path) == []  # no results.json with figures of a NaN model
    assert cache_leftovers(cache) == []  # no entry, lock, temporary folder or checkpoint


def test_a_diverging_fine_tune_names_its_stage(tmp_path):
    cache = tmp_path / "cache"
    proc = run_bdrun(
        "defense=finetune",
        "defense.lr=1000",
        "debug=smoke",
        "logger=none",
        cwd=tmp_path,
        env={"BDRUN_CACHE": str(cache)},
    )
    assert proc.returncode == 2, proc.stderr
    [line] = proc.stderr.strip().splitlines()
    assert line.startswith("bdrun: error: training diverged: the loss became NaN in epoch ")
    assert line.endswith(" of 10 of training stream 'finetune' (lr 1000); lower the learning rate")
    assert run_folders(tmp_path) == []
    # the poisoned model trained fine and stays cached; the fine-tune left nothing behind
    lock, entry = cache_leftovers(cache)
    assert lock == f".{entry}.lock"
    assert all(
        torch.isfinite(t).all() for t in load_file(cache / "models" / entry / MODEL_FILE).values()
    )


@pytest.mark.parametrize(
    "overrides, message",
    [
        # a real setting (0.01 and 0.1 train): the mask generator's loss is NaN within epoch 1
        (
            ("attack=input_aware", "attack.lr_mask=1"),
            "the loss became NaN in epoch 1 of 25 of input-aware's mask generator pre-training "
            "(attack.lr_mask 1); lower attack.lr_mask",
        ),
        # the cost is set to init_cost after 5 successful steps at cost 0: 3e38 (within float32)
        # times the mask's L1 norm overflows
        (
            ("defense=neural_cleanse", "defense.init_cost=3e38"),
            "the loss became infinite in step 6 of 20 of Neural Cleanse's trigger reversal "
            "(defense.mask_lr 0.1); lower defense.mask_lr or defense.init_cost",
        ),
    ],
    ids=["input_aware-mask", "neural_cleanse"],
)
def test_a_diverging_hand_written_optimisation_is_an_error(overrides, message, tmp_path):
    proc = run_bdrun(*overrides, "debug=smoke", "logger=none", cwd=tmp_path)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.strip().splitlines() == [f"bdrun: error: training diverged: {message}"]
    assert run_folders(tmp_path) == []


def test_a_sweep_records_the_diverged_job_as_failed_and_goes_on(tmp_path):
    proc = run_bdrun(
        "-m",
        "train.lr=1000,0.05",
        "debug=smoke",
        "logger=none",
        cwd=tmp_path,
        env={"BDRUN_CACHE": str(tmp_path / "cache")},
    )
    assert proc.returncode == 1, proc.stderr
    [sweep] = [p.parent for p in (tmp_path / "outputs" / "multirun").rglob("multirun.yaml")]
    reason = (
        "training diverged: the loss became NaN in epoch 1 of 1 of the poisoned model's "
        "training (lr 1000); lower the learning rate"
    )
    error = json.loads((sweep / "0" / "error.json").read_text())
    assert error["type"] == "TrainingDiverged" and error["error"] == reason
    assert not (sweep / "0" / "results.json").exists()
    results = json.loads((sweep / "1" / "results.json").read_text())
    assert results["config"]["train"]["lr"] == 0.05  # the job after it ran, to its figures
    assert all(0 <= results["metrics"][when]["cca"] <= 1 for when in ("before", "after"))
    summary = (sweep / "summary.md").read_text()
    assert "1 done, 1 failed" in summary and reason in summary
    assert f"  job 0 (train.lr=1000 debug=smoke logger=none): {reason}" in proc.stderr


# -- the model cache -------------------------------------------------------------------------------


def linear(value: float) -> nn.Module:
    model = nn.Linear(3, 2)
    with torch.no_grad():
        model.weight.fill_(value)
        model.bias.fill_(1.0)
    return model


def test_the_cache_never_stores_a_model_that_is_not_finite(tmp_path):
    cache = ModelCache(tmp_path)
    with pytest.raises(TrainingDiverged, match="not stored in the model cache"):
        cache.get_or_train("k", linear(0.0), lambda: linear(float("nan")), {})
    assert list(tmp_path.iterdir()) == []  # no entry, no lock file, no temporary folder


def test_a_cached_model_that_is_not_finite_is_no_hit(tmp_path):
    cache = ModelCache(tmp_path)
    cache.get_or_train("k", linear(0.0), lambda: linear(1.0), {})
    save_file(linear(float("inf")).state_dict(), str(tmp_path / "k" / MODEL_FILE))  # older bdrun
    model, status = cache.get_or_train("k", linear(0.0), lambda: linear(2.0), {})
    assert status == "miss" and float(model.weight.detach()[0, 0]) == 2.0
    assert float(load_file(tmp_path / "k" / MODEL_FILE)["weight"][0, 0]) == 2.0

    save_file(linear(float("nan")).state_dict(), str(tmp_path / "k" / MODEL_FILE))
    given = linear(3.0)
    with pytest.raises(TrainingDiverged):  # the recomputation diverges too: nothing is kept
        cache.get_or_train("k", given, lambda: linear(float("nan")), {})
    assert float(given.weight.detach()[0, 0]) == 3.0  # the rejected entry was not loaded into it
    assert list(tmp_path.iterdir()) == []


class Record(nn.Module):
    """A training hook's record (as ABL's worst loss so far): a buffer that starts at -inf."""

    def __init__(self) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.ones(2))
        self.register_buffer("worst", torch.full((2,), -torch.inf))


def test_a_companion_buffer_at_minus_inf_is_no_divergence(tmp_path):
    cache = ModelCache(tmp_path)
    record = Record()
    _, status = cache.get_or_train("k", linear(0.0), lambda: linear(1.0), {}, {"record": record})
    assert status == "miss"
    _, status = cache.get_or_train("k", linear(0.0), lambda: linear(2.0), {}, {"record": Record()})
    assert status == "hit"
    with torch.no_grad():
        record.scale.fill_(float("nan"))  # a companion's parameters count, as the model's
    with pytest.raises(TrainingDiverged, match="the weights of record are not finite"):
        ModelCache(tmp_path, refresh=True).get_or_train(
            "k", linear(0.0), lambda: linear(1.0), {}, {"record": record}
        )


def test_a_run_retrains_a_poisoned_model_cached_with_nan_weights(tmp_path):
    cfg = compose_config("debug=smoke", "logger=none", f"cache.dir={tmp_path / 'models'}")
    first = run(cfg, tmp_path / "first")
    [entry] = [p for p in (tmp_path / "models").iterdir() if not p.name.startswith(".")]
    weights = load_file(entry / MODEL_FILE)
    save_file(
        {k: torch.full_like(v, float("nan")) for k, v in weights.items()}, str(entry / MODEL_FILE)
    )
    second = run(cfg, tmp_path / "second")
    assert first["cache"]["model"] == "miss" and second["cache"]["model"] == "miss"
    assert second["metrics"] == first["metrics"]
    assert all(torch.isfinite(t).all() for t in load_file(entry / MODEL_FILE).values())


# -- files a user hands in -------------------------------------------------------------------------


def write_h5(path: Path, x: np.ndarray, y: np.ndarray) -> Path:
    with h5py.File(path, "w") as f:
        f["data"] = x
        f["label"] = y
    return path


def test_an_h5_data_set_with_a_nan_pixel_is_refused_when_loaded(tmp_path):
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, (40, 8, 8, 3)).astype(np.float32)
    x[3, 2, 1, 0] = np.nan
    train = write_h5(tmp_path / "train.h5", x, np.arange(40) % 4)
    test = write_h5(tmp_path / "test.h5", np.zeros((8, 8, 8, 3), np.float32), np.arange(8) % 4)
    proc = run_bdrun(
        "dataset=h5",
        f"dataset.source.train_path={train}",
        f"dataset.source.test_path={test}",
        "logger=none",
        cwd=tmp_path,
    )
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.strip().splitlines() == [
        f"bdrun: error: {train}: 'data' holds 1 NaN / inf values; replace them with real numbers "
        "or drop those samples"
    ]
    assert run_folders(tmp_path) == []


def test_pretrained_files_that_are_not_finite_are_refused(tmp_path):
    overrides = attack_overrides("pretrained", tmp_path)
    weights = Path(overrides[0].split("=", 1)[1])
    poisoned = Path(overrides[1].split("=", 1)[1].strip("[]"))
    cfg = compose_config("attack=pretrained", "logger=none", *overrides)

    with h5py.File(poisoned, "r+") as f:
        data = f["data"][...]
        data[0, 0, 0, :2] = [np.inf, -np.inf]
        f["data"][...] = data
    with pytest.raises(BdrunError, match=rf"^{poisoned}: 'data' holds 2 NaN / inf values"):
        run(cfg, tmp_path / "run")

    with h5py.File(poisoned, "r+") as f:
        f["data"][...] = np.nan_to_num(data, posinf=0, neginf=0)
    state = load_file(weights)
    name = next(iter(state))
    state[name].view(-1)[0] = float("nan")
    save_file(state, str(weights))
    with pytest.raises(
        BdrunError, match=rf"^{weights}: 1 weights are NaN / inf \(first in '{name}'\)"
    ):
        run(cfg, tmp_path / "run")


def test_keras_weights_that_are_not_finite_are_refused(tmp_path):
    kernel = np.ones((4, 2), np.float32)
    kernel[1, 1] = np.nan
    path = write_keras_h5(
        {"dense": {"kernel": kernel, "bias": np.zeros(2, np.float32)}}, tmp_path / "w.h5"
    )
    with pytest.raises(BdrunError, match=r"1 weights are NaN / inf \(first in 'dense/kernel'\)"):
        read_keras_layers(path)


def test_other_float_files_that_are_not_finite_are_refused(tmp_path):
    trigger = np.ones((3, 3), np.float32)
    trigger[0, 0] = np.inf
    np.save(tmp_path / "trigger.npy", trigger)
    with pytest.raises(BdrunError, match=r"trigger.npy holds 1 NaN / inf values"):
        load_image(tmp_path / "trigger.npy", channels=1)

    images = np.zeros((2, 4, 4), ">f4")  # IDX type 0x0D: big-endian float32
    images[1, 2, 3] = np.nan
    header = struct.pack(">BBBB", 0, 0, 0x0D, 3) + struct.pack(">III", *images.shape)
    (tmp_path / "images-idx3").write_bytes(header + images.tobytes())
    with pytest.raises(BdrunError, match=r"images-idx3 holds 1 NaN / inf values"):
        read_idx(tmp_path / "images-idx3")

    unlabelled = tmp_path / "unlabelled.h5"
    with h5py.File(unlabelled, "w") as f:
        f["data"] = np.full((2, 8, 8, 3), np.nan, np.float32)
    with pytest.raises(BdrunError, match=r"unlabelled.h5: 'data' holds 384 NaN / inf values"):
        read_h5_images(unlabelled, "data", "label", "auto", 255.0)  # bdrun-eval's reader
