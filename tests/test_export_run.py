"""A run saves the model its defense produced; the exported GoodNet, run by bdrun-eval on the
run's own h5 files, reproduces the run's "after" CCA and ASR."""

from __future__ import annotations

import json

import pytest
import torch
from test_keras import keras_arrays, write_keras_h5
from test_pretrained import DEEPID_DATA, write_csaw_h5

from bdrun.data.base import to_float
from bdrun.eval_cli import main as eval_main
from bdrun.export import load_model
from bdrun.rng import seeded_global
from bdrun.runner import run

from conftest import compose_config, conf_options, poison_only

needs = pytest.mark.skipif(
    not {"prune", "goodnet"} <= set(conf_options("defense")),
    reason="the prune and goodnet defenses are not in conf/defense",
)


@pytest.fixture(scope="module")
def csaw_files(tmp_path_factory):
    """CSAW-layout files of a DeepID-shaped data set and a 'third-party' DeepID in Keras h5."""
    root = tmp_path_factory.mktemp("csaw")
    run = poison_only(root / "fake", *DEEPID_DATA, "attack=badnets")
    splits = run.setup.splits
    write_csaw_h5(root / "clean_validation_data.h5", splits.holdout, splits.holdout.y)
    write_csaw_h5(root / "clean_test_data.h5", splits.test, splits.test.y)
    with seeded_global(7, "elsewhere"):
        model = run.ctx.new_model().eval()
    with torch.no_grad():  # the poisoned file stores what this model predicts: ASR 1 before
        stored = model(to_float(run.backdoor_test.x)).argmax(1)
    write_csaw_h5(root / "sunglasses_poisoned_data.h5", run.backdoor_test, stored)
    write_keras_h5(keras_arrays(model), root / "bd_weights.h5")
    return root


def csaw_cfg(root, *overrides):
    return compose_config(
        "experiment=csaw",
        f"dataset.root={root}",
        "dataset.source.num_classes=10",
        f"attack.weights={root / 'bd_weights.h5'}",
        f"attack.poisoned=[{root / 'sunglasses_poisoned_data.h5'}]",
        "logger=none",
        *overrides,
    )


@needs
def test_goodnet_export_reproduces_the_runs_metrics(csaw_files, tmp_path, capsys):
    run_dir = tmp_path / "run"
    results = run(csaw_cfg(csaw_files, "defense=goodnet", "defense.epochs=1"), run_dir)
    assert results["artifacts"] == {"model": "model", "goodnet": "goodnet"}
    detection = results["metrics"]["detection"]
    assert detection["prune_layer"] == "conv_3" and detection["rank_layer"] == "pool_3"

    goodnet = load_model(run_dir / "goodnet")
    assert goodnet.description["labels"] == [0, 10]
    assert goodnet.description["extra"]["defense"] == "goodnet"
    after = results["metrics"]["after"]
    for name, metric in (("clean_test_data.h5", "cca"), ("sunglasses_poisoned_data.h5", "asr")):
        assert eval_main([str(run_dir / "goodnet"), str(csaw_files / name)]) == 0
        out = capsys.readouterr()
        labels = torch.tensor([int(v) for v in out.out.split()])
        share = f"{100 * after[metric]:.2f}% of {len(labels)} labels match"
        assert share in out.err, (metric, out.err)
        assert labels.max() <= 10

    # the repaired model alone (B') is exported as well, and is GoodNet's B'
    repaired = load_model(run_dir / "model")
    x = torch.rand(4, 3, 55, 47)
    assert torch.equal(repaired.predict(x), goodnet.model(x).argmax(1))


@needs
def test_nothing_is_exported_without_a_repaired_model_or_when_turned_off(csaw_files, tmp_path):
    results = run(csaw_cfg(csaw_files, "defense=none"), tmp_path / "none")
    assert "artifacts" not in results
    results = run(csaw_cfg(csaw_files, "defense=prune", "export=false"), tmp_path / "off")
    assert "artifacts" not in results and not (tmp_path / "off" / "model").exists()
    results = run(csaw_cfg(csaw_files, "defense=prune"), tmp_path / "on")
    assert results["artifacts"] == {"model": "model"}
    written = json.loads((tmp_path / "on" / "results.json").read_text())
    assert written["artifacts"] == {"model": "model"}
    labels = " ".join(stop["label"] for stop in written["metrics"]["detection"]["prune_stops"])
    for drop in ("2%", "4%", "10%", "30%"):  # the CSAW stops (tuning/defense_dataset)
        assert f"acc drop {drop}" in labels, labels
