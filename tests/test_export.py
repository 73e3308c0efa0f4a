"""Export of repaired models and GoodNets (safetensors + JSON) and the `bdrun-eval` command."""

from __future__ import annotations

import copy
import json
import subprocess
import sys

import h5py
import numpy as np
import pytest
import torch
from PIL import Image
from torch.nn.utils import prune

from bdrun.errors import BdrunError
from bdrun.eval_cli import main as eval_main
from bdrun.export import build_model, load_model, save_model
from bdrun.models.deepid import DeepID
from bdrun.rng import seeded_global

CLASSES = 7


def deepid(seed: int, **kwargs) -> DeepID:
    with seeded_global(seed, "export-test"):
        return DeepID(num_classes=CLASSES, **kwargs).eval()


def images(n: int, seed: int = 0) -> torch.Tensor:
    """[0, 1] images on the 1/255 grid, as image and h5 files store them."""
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, 3, 55, 47), generator=g).float() / 255


def test_round_trip_keeps_architecture_and_normalisation(tmp_path):
    model = deepid(0, input_scale=255.0, mean=[10.0, 20.0, 30.0], std=[50.0, 60.0, 70.0])
    folder = save_model(tmp_path / "model", model, divide_by=255.0, extra={"defense": "x"})
    description = json.loads((folder / "model.json").read_text())
    assert description["model"]["_target_"] == "bdrun.models.deepid.DeepID"
    assert description["model"]["input_scale"] == 255.0
    assert description["model"]["mean"] == [10.0, 20.0, 30.0]
    assert description["input"]["divide_by"] == 255.0 and description["labels"] == [0, 6]
    loaded = load_model(folder)
    x = images(4)
    with torch.no_grad():
        assert torch.equal(loaded.model(x), model(x))
    assert torch.equal(loaded.predict(x), model(x).argmax(1))
    assert sorted(p.name for p in folder.iterdir()) == ["model.json", "model.safetensors"]


def test_pruning_masks_are_folded_into_the_weights(tmp_path):
    model = deepid(0)
    keep = torch.ones(60)
    keep[:25] = 0
    prune.custom_from_mask(model.conv_3, "weight", keep.view(-1, 1, 1, 1).expand(60, 40, 3, 3))
    prune.custom_from_mask(model.conv_3, "bias", keep)
    assert "conv_3.weight_orig" in model.state_dict()
    loaded = load_model(save_model(tmp_path / "pruned", model)).model
    assert torch.all(loaded.conv_3.weight[:25] == 0) and torch.all(loaded.conv_3.bias[:25] == 0)
    x = images(3)
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))
    assert "conv_3.weight_orig" in model.state_dict(), "the exported model is left as it was"


def test_state_outside_the_weights_is_refused(tmp_path):
    model = deepid(0)
    model.conv_3.register_forward_hook(lambda _m, _i, out: out * 0)
    with pytest.raises(BdrunError, match="does not reproduce the model's outputs"):
        save_model(tmp_path / "hooked", model)
    assert not (tmp_path / "hooked").exists(), "nothing half-written"


def disagreeing_pair(x: torch.Tensor) -> tuple[DeepID, DeepID]:
    """Two models that agree on about half of x: the second favours class 3 by the median
    margin of the first."""
    repaired = deepid(1)
    original = copy.deepcopy(repaired)
    with torch.no_grad():
        logits = repaired(x)
        margin = logits.max(1).values - logits[:, 3]
        original.output.bias[3] += margin.median() + 1e-4
    return repaired, original


def test_goodnet_outputs_the_extra_class_where_the_models_disagree(tmp_path):
    x = images(64)
    repaired, original = disagreeing_pair(x)
    folder = save_model(tmp_path / "goodnet", repaired, reference=original)
    goodnet = load_model(folder)
    assert goodnet.description["labels"] == [0, CLASSES]
    with torch.no_grad():
        a, b = repaired(x).argmax(1), original(x).argmax(1)
    labels = goodnet.predict(x)
    assert torch.equal(labels[a == b], a[a == b])
    assert torch.all(labels[a != b] == CLASSES)
    assert (a != b).any() and (a == b).any(), "the check covers both cases"


def test_only_bdrun_models_are_built():
    with pytest.raises(BdrunError, match="not a bdrun model"):
        build_model({"_target_": "os.system", "command": "true"})
    with pytest.raises(BdrunError, match="unknown model class"):
        build_model({"_target_": "bdrun.models.deepid.Nope"})


# -- bdrun-eval ---------------------------------------------------------------------------------


@pytest.fixture
def goodnet_folder(tmp_path):
    repaired, original = disagreeing_pair(images(64))
    folder = save_model(tmp_path / "goodnet", repaired, reference=original)
    return folder, load_model(folder)


def test_eval_labels_an_image_file(goodnet_folder, tmp_path, capsys):
    folder, goodnet = goodnet_folder
    x = images(1, seed=5)
    path = tmp_path / "face.png"
    Image.fromarray((x[0].permute(1, 2, 0) * 255).round().byte().numpy()).save(path)
    assert eval_main([str(folder), str(path)]) == 0
    assert capsys.readouterr().out == f"{int(goodnet.predict(x)[0])}\n"
    assert torch.is_grad_enabled()  # called in-process, it leaves the caller's grad mode


def test_eval_labels_every_image_of_an_h5_file(goodnet_folder, tmp_path, capsys):
    folder, goodnet = goodnet_folder
    x = images(40, seed=6)
    expected = goodnet.predict(x)
    path = tmp_path / "clean_test_data.h5"
    with h5py.File(path, "w") as f:  # CSAW layout: (N, 3, 55, 47) floats 0..255, float labels
        f["data"] = (x * 255).numpy()
        f["label"] = expected.numpy().astype(np.float64)
    assert eval_main([str(folder), str(path)]) == 0
    out = capsys.readouterr()
    assert [int(v) for v in out.out.split()] == expected.tolist()
    assert "100.00% of 40 labels match" in out.err
    assert all(0 <= v <= CLASSES for v in expected.tolist())


def test_eval_errors_are_one_line(goodnet_folder, tmp_path, capsys):
    folder, _ = goodnet_folder
    small = tmp_path / "small.png"
    Image.new("RGB", (20, 20)).save(small)
    assert eval_main([str(folder), str(small)]) == 2
    assert (
        capsys.readouterr()
        .err.strip()
        .endswith("the model takes 47x55 (width x height): resize it first")
    )
    assert eval_main([str(tmp_path), str(small)]) == 2
    assert "is not an exported bdrun model" in capsys.readouterr().err


def test_the_installed_command_runs(goodnet_folder, tmp_path):
    folder, goodnet = goodnet_folder
    path = tmp_path / "data.h5"
    x = images(3, seed=7)
    with h5py.File(path, "w") as f:
        f["data"] = (x * 255).permute(0, 2, 3, 1).numpy()  # NHWC works as well, no labels
    proc = subprocess.run(
        [sys.executable, "-m", "bdrun.eval_cli", str(folder), str(path)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    assert [int(v) for v in proc.stdout.split()] == goodnet.predict(x).tolist()
