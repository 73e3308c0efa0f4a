"""attack=pretrained: a BadNet trained elsewhere, loaded from Keras h5 / safetensors / a state dict,
scored on poisoned h5 files whose labels are the targets (CSAW-HackML semantics)."""

from __future__ import annotations

import argparse
import math
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
from safetensors.torch import save_file
from test_keras import keras_arrays, write_keras_h5

from bdrun.data.base import ImageSet, to_float
from bdrun.errors import BdrunError
from bdrun.rng import seeded_global
from bdrun.runner import prepare, run

from conftest import compose_config, poison_only, run_bdrun

# a DeepID-shaped synthetic data set (55x47x3, as CSAW's YouTube faces), small and quick
DEEPID_DATA = (
    "dataset=fake",
    "dataset.source.shape=[3,55,47]",
    "dataset.source.n_train=300",
    "dataset.source.n_test=200",
    "model=deepid",
    "logger=none",
)


def write_csaw_h5(path: Path, data: ImageSet, labels: torch.Tensor, **extra) -> Path:
    """Images as CSAW ships them: float 0..255, (N, 3, H, W), labels in `label`."""
    with h5py.File(path, "w") as f:
        f["data"] = (to_float(data.x) * 255).round().numpy().astype(np.float32)
        f["label"] = labels.numpy().astype(np.float64)  # CSAW stores labels as floats
        for key, value in extra.items():
            f[key] = value.numpy()
    return path


@pytest.fixture(scope="module")
def badnet(tmp_path_factory):
    """A DeepID 'trained elsewhere' (seeded weights that bdrun's own initialisation would not
    give, so loading is really tested), its metrics, its weights in every format, and the
    BadNets backdoor test set as a poisoned h5 file (labels = target, true labels alongside)."""
    folder = tmp_path_factory.mktemp("badnet")
    run = poison_only(folder / "run", *DEEPID_DATA, "attack=badnets")
    with seeded_global(123, "elsewhere"):
        model = run.ctx.new_model().eval()
    model.output.bias.data[:3] += 0.05  # spread predictions over a few classes
    metrics = run.evaluate(model)
    bd = run.backdoor_test
    files = {
        "keras": write_keras_h5(keras_arrays(model), folder / "bd_weights.h5"),
        "safetensors": folder / "bd.safetensors",
        "torch": folder / "bd.pt",
    }
    save_file(model.state_dict(), str(files["safetensors"]))
    torch.save({f"model.{k}": v for k, v in model.state_dict().items()}, files["torch"])
    poisoned = write_csaw_h5(folder / "bd_test.h5", bd, bd.y, true_label=bd.orig_y)
    return {"model": model, "metrics": metrics, "files": files, "poisoned": poisoned, "bd": bd}


def pretrained_cfg(weights: Path, *poisoned: Path, extra: tuple[str, ...] = ()):
    files = ",".join(str(p) for p in poisoned)
    return compose_config(
        *DEEPID_DATA,
        "attack=pretrained",
        f"attack.weights={weights}",
        f"attack.poisoned=[{files}]",
        *extra,
    )


@pytest.mark.parametrize("fmt", ["keras", "safetensors", "torch"])
def test_a_loaded_model_is_the_one_trained_elsewhere(fmt, badnet, tmp_path):
    cfg = pretrained_cfg(
        badnet["files"][fmt], badnet["poisoned"], extra=("attack.true_label_key=true_label",)
    )
    prepared = prepare(cfg, tmp_path / "prepared")
    loaded = prepared.model
    assert prepared.model_status == "pretrained"
    x = to_float(prepared.data.test.x[:32])
    with torch.no_grad():
        assert torch.equal(loaded(x), badnet["model"](x))

    assert prepared.ctx.evaluate(loaded) == badnet["metrics"]  # CCA, ASR and RA (true labels given)


def test_each_poisoned_file_gets_its_asr(badnet, tmp_path):
    """CSAW semantics: ASR = share of a file's inputs classified as their stored label. File 1
    stores what the model predicts (ASR 1), file 2 the next label (ASR 0)."""
    bd = badnet["bd"]
    with torch.no_grad():
        predicted = badnet["model"](to_float(bd.x)).argmax(1)
    half = len(bd) // 2
    first = write_csaw_h5(
        tmp_path / "eyebrows_poisoned_data.h5", bd.subset(slice(0, half)), predicted[:half]
    )
    second = write_csaw_h5(
        tmp_path / "lipstick_poisoned_data.h5",
        bd.subset(slice(half, None)),
        (predicted[half:] + 1) % 10,
    )
    results = run(pretrained_cfg(badnet["files"]["safetensors"], first, second), tmp_path / "run")
    assert results["cache"]["model"] == "pretrained"
    assert results["poison"]["train_poisoned"] == 0
    assert results["poison"]["backdoor_test_size"] == len(bd)
    before = results["metrics"]["before"]
    assert before["asr_eyebrows_poisoned_data"] == 1.0
    assert before["asr_lipstick_poisoned_data"] == 0.0
    assert before["asr"] == half / len(bd)
    assert before["ra"] != before["ra"], "no true labels in the files: RA is undefined (NaN)"
    assert '"ra": null' in (tmp_path / "run" / "results.json").read_text()


def test_inputs_already_of_their_target_are_dropped_when_truth_is_known(badnet, tmp_path):
    bd = badnet["bd"]
    truth = bd.orig_y.clone()
    truth[:5] = bd.y[:5]  # five inputs whose true label is the target
    path = write_csaw_h5(tmp_path / "bd.h5", bd, bd.y, true_label=truth)
    cfg = pretrained_cfg(
        badnet["files"]["torch"], path, extra=("attack.true_label_key=true_label",)
    )
    assert len(poison_only(tmp_path / "run", cfg=cfg).backdoor_test) == len(bd) - 5


def test_no_poisoned_files_means_no_asr_but_a_working_model(badnet, tmp_path):
    results = run(pretrained_cfg(badnet["files"]["keras"]), tmp_path)
    before = results["metrics"]["before"]
    assert before["cca"] == badnet["metrics"]["cca"]
    assert before["asr"] != before["asr"]  # NaN -> null in results.json


def test_unknown_true_labels_leave_ra_undefined_everywhere():
    from bdrun.metrics import accuracy

    preds = torch.tensor([1, 2, 3, 4])
    assert accuracy(preds, torch.tensor([1, -1, 3, -1])) == 1.0  # known labels only
    assert math.isnan(accuracy(preds, torch.full((4,), -1)))  # RA without true labels
    assert accuracy(preds, torch.tensor([1, 0, 0, 4])) == 0.5


# -- normalisation ---------------------------------------------------------------------------


def test_csaw_normalisation_defaults_to_the_competition_eval():
    cfg = compose_config("dataset=csaw", "model=deepid", "attack=pretrained")
    assert cfg.dataset.source.divide_by == 255.0 and cfg.model.input_scale == 1.0
    assert cfg.attack.divide_by == 255.0
    lab3 = compose_config("dataset=csaw", "model=deepid", "dataset.pixel_scale=255")
    assert lab3.model.input_scale == 255.0
    assert compose_config("model=deepid").model.input_scale == 1.0  # other data: [0, 1]


def test_csaw_experiments_compose():
    competition = compose_config("experiment=csaw", "dataset.root=/d")
    assert competition.model.input_scale == 1.0 and competition.attack.name == "pretrained"
    assert competition.dataset.source.holdout_path == "/d/clean_validation_data.h5"
    lab3 = compose_config("experiment=csaw_lab3", "dataset.root=/d")
    assert lab3.model.input_scale == 255.0  # lab3/eval.py feeds raw pixels
    assert lab3.dataset.source.test_path == "/d/cl/test.h5"
    assert list(lab3.attack.poisoned) == ["/d/bd/bd_test.h5"]


def test_csaw_dataset_reads_the_competition_layout(badnet, tmp_path):
    """dataset=csaw on CSAW-layout files: (N,3,55,47) floats 0..255, labels as floats."""
    splits = poison_only(tmp_path / "fake", *DEEPID_DATA, "attack=none").setup.splits
    write_csaw_h5(tmp_path / "clean_validation_data.h5", splits.holdout, splits.holdout.y)
    write_csaw_h5(tmp_path / "clean_test_data.h5", splits.test, splits.test.y)
    cfg = compose_config(
        "dataset=csaw",
        f"dataset.root={tmp_path}",
        "dataset.source.num_classes=10",
        "model=deepid",
        "attack=pretrained",
        f"attack.weights={badnet['files']['keras']}",
        f"attack.poisoned=[{badnet['poisoned']}]",
        "logger=none",
    )
    results = run(cfg, tmp_path / "run")
    before = results["metrics"]["before"]
    assert before["cca"] == badnet["metrics"]["cca"]  # the same test images, read from h5
    assert before["asr"] == badnet["metrics"]["asr"]


# -- errors -----------------------------------------------------------------------------------


def test_missing_weights_is_a_one_line_cli_error(tmp_path):
    proc = run_bdrun("attack=pretrained", "logger=none", cwd=tmp_path)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        "bdrun: error: attack=pretrained needs attack.weights=PATH (Keras .h5, .safetensors "
        "or a PyTorch state dict)"
    ]
    assert not (tmp_path / "outputs").exists() or not any((tmp_path / "outputs").rglob("*.json"))


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda d: d / "absent.safetensors", "file not found"),
        (lambda d: d / "weights.txt", "unknown suffix '.txt'"),
    ],
)
def test_bad_weights_paths(make, message, badnet, tmp_path):
    path = make(tmp_path)
    if path.suffix == ".txt":
        path.write_text("not weights")
    cfg = pretrained_cfg(path, badnet["poisoned"])
    with pytest.raises(BdrunError, match=message):
        run(cfg, tmp_path / "run")


def test_weights_of_another_model_name_the_first_bad_entry(badnet, tmp_path):
    state = torch.load(badnet["files"]["torch"], weights_only=True)
    state["model.fc_1.weight"] = state["model.fc_1.weight"][:, :100].clone()
    path = tmp_path / "narrow.pt"
    torch.save(state, path)
    with pytest.raises(BdrunError, match=r"'fc_1.weight' has shape \(160, 100\)"):
        run(pretrained_cfg(path, badnet["poisoned"]), tmp_path / "run")
    with pytest.raises(BdrunError, match="has no layer 'conv1' that the model needs"):
        run(
            compose_config(
                *DEEPID_DATA,
                "model=lenet",
                "attack=pretrained",
                f"attack.weights={badnet['files']['keras']}",
            ),
            tmp_path / "run2",
        )


def test_pickled_objects_are_refused(tmp_path, badnet):
    path = tmp_path / "pickled.pt"
    torch.save({"weight": torch.zeros(1), "args": argparse.Namespace(lr=1)}, path)
    with pytest.raises(BdrunError, match="is not a plain PyTorch state dict"):
        run(pretrained_cfg(path, badnet["poisoned"]), tmp_path / "run")


def test_poisoned_files_must_fit_the_data(badnet, tmp_path):
    bd = badnet["bd"]
    wrong_label = write_csaw_h5(tmp_path / "labels.h5", bd, torch.full_like(bd.y, 12))
    with pytest.raises(BdrunError, match="has label 12 but the data set has 10 classes"):
        prepare(pretrained_cfg(badnet["files"]["torch"], wrong_label), tmp_path / "run")
    small = ImageSet(torch.zeros(4, 3, 20, 20), torch.zeros(4, dtype=torch.long))
    wrong_shape = write_csaw_h5(tmp_path / "small.h5", small, small.y)
    with pytest.raises(BdrunError, match="holds 3x20x20 images but the data set's are 3x55x47"):
        prepare(pretrained_cfg(badnet["files"]["torch"], wrong_shape), tmp_path / "run")
