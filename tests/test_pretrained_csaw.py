"""The CSAW-HackML workflow end to end on a generated DeepID-shaped data set (slow).

A BadNet is trained by bdrun on synthetic 'faces' (20 identities, smooth class templates plus
noise, 55x47x3, stored as CSAW stores them), written out as a Keras 2 weights file, and then
defended the CSAW way: experiment=csaw, attack=pretrained with the poisoned test file, and each
defense on top.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from test_keras import keras_arrays, write_keras_h5
from test_pretrained import write_csaw_h5

from bdrun.data.base import ImageSet
from bdrun.runner import prepare, run

from conftest import compose_config, conf_options

pytestmark = pytest.mark.slow
IDENTITIES = 20
BADNET_TRAINING = (
    "model=deepid",
    "attack=badnets",
    "attack.pattern=checkerboard",
    "attack.size=10",
    "attack.margin=3",
    "attack.poison_rate=0.2",
    "attack.target=0",
    "train.optimizer=adam",
    "train.lr=0.002",
    "train.epochs=6",
    "logger=none",
)


def synthetic_faces(n: int, templates: torch.Tensor, g: torch.Generator) -> ImageSet:
    """n images: a random identity's smooth template, 30 % uniform noise, 8-bit values."""
    y = torch.randint(len(templates), (n,), generator=g)
    x = 0.7 * templates[y] + 0.3 * torch.rand(n, *templates.shape[1:], generator=g)
    return ImageSet(x.mul(255).round().to(torch.uint8), y)


def write_synthetic_csaw(root: Path, *overrides: str) -> dict:
    """CSAW-layout files under `root`: clean data of IDENTITIES synthetic faces, a BadNet bdrun
    trains on the attacker's own set (Keras .h5 weights) and its poisoned test file; returns
    the BadNet's figures. (scripts/experiments/strip_csaw.py builds its data here too.)"""
    g = torch.Generator().manual_seed(0)
    coarse = torch.rand(IDENTITIES, 3, 6, 5, generator=g)
    templates = F.interpolate(coarse, size=(55, 47), mode="bilinear", align_corners=False)
    for name, n in (("train", 1000), ("clean_validation_data", 400), ("clean_test_data", 400)):
        data = synthetic_faces(n, templates, g)
        write_csaw_h5(root / f"{name}.h5", data, data.y)

    # the attacker's side: bdrun trains the BadNet (on the attacker's own training set)
    attacker = compose_config(
        "dataset=h5",
        f"dataset.source.train_path={root / 'train.h5'}",
        f"dataset.source.test_path={root / 'clean_test_data.h5'}",
        f"dataset.source.holdout_path={root / 'clean_validation_data.h5'}",
        *BADNET_TRAINING,
        *overrides,
    )
    prepared = prepare(attacker, root / "attacker")
    badnet = prepared.model
    metrics = prepared.ctx.evaluate(badnet)
    write_keras_h5(keras_arrays(badnet), root / "bd_weights.h5")
    bd = prepared.data.backdoor_test
    write_csaw_h5(root / "sunglasses_poisoned_data.h5", bd, bd.y)
    return metrics


@pytest.fixture(scope="module")
def csaw(tmp_path_factory) -> dict:
    root: Path = tmp_path_factory.mktemp("csaw")
    return {"root": root, "metrics": write_synthetic_csaw(root)}


def defended(csaw: dict, run_dir: Path, *overrides: str) -> dict:
    root = csaw["root"]
    cfg = compose_config(
        "experiment=csaw",
        f"dataset.root={root}",
        f"dataset.source.num_classes={IDENTITIES}",
        f"attack.weights={root / 'bd_weights.h5'}",
        f"attack.poisoned=[{root / 'sunglasses_poisoned_data.h5'}]",
        "logger=none",
        *overrides,
    )
    return run(cfg, run_dir)


def test_the_badnet_works_and_loads_from_keras(csaw, tmp_path):
    trained = csaw["metrics"]
    assert trained["cca"] >= 0.9 and trained["asr"] >= 0.9, trained
    before = defended(csaw, tmp_path)["metrics"]["before"]
    assert before["cca"] == trained["cca"] and before["asr"] == trained["asr"]


def needs(defense: str):
    return pytest.mark.skipif(
        defense not in conf_options("defense"), reason=f"defense {defense} is not in conf/defense"
    )


# What these defenses achieve on this synthetic BadNet (measured, CPU, seed 0): its 10x10
# checkerboard backdoor survives pruning conv_3 down to its last channel (ASR 1.0 at every
# CSAW stop; the repaired nets keep CCA >= 0.93 at the 2 / 4 / 10 % stops), so fine-pruning and
# GoodNet leave ASR at 1.0; STRIP reaches AUROC 0.83 (ASR 1.0 -> 0.75); Neural Cleanse with
# 20 steps flags nothing. The tests check that the CSAW settings are applied and that the
# defenses keep clean accuracy, and record the rest. STRIP's blend: docs/tuning/strip_csaw.md.


@needs("goodnet")
def test_goodnet_with_the_csaw_settings(csaw, tmp_path):
    results = defended(csaw, tmp_path, "defense=goodnet")
    metrics = results["metrics"]
    detection = metrics["detection"]
    print("goodnet", metrics["after"], detection)
    assert detection["prune_layer"] == "conv_3" and detection["rank_layer"] == "pool_3"
    assert len(detection["prune_stops"]) == 5  # chosen + 2 / 4 / 10 / 30 %
    assert detection["holdout_acc_finetuned"] >= 0.9  # Adam 1e-3 keeps the net intact
    assert metrics["after"]["cca"] >= metrics["before"]["cca"] - 0.05
    assert results["artifacts"]["goodnet"] == "goodnet"


@needs("fine_pruning")
def test_fine_pruning_with_the_csaw_settings(csaw, tmp_path):
    results = defended(csaw, tmp_path, "defense=fine_pruning")
    metrics = results["metrics"]
    print("fine_pruning", metrics["after"], metrics["detection"])
    assert metrics["after"]["cca"] >= metrics["before"]["cca"] - 0.05
    assert results["artifacts"]["model"] == "model"


@needs("strip")
def test_strip_rejects_some_poisoned_inputs(csaw, tmp_path):
    results = defended(csaw, tmp_path, "defense=strip")
    metrics = results["metrics"]
    print("strip", metrics["after"], metrics["detection"])
    assert metrics["detection"]["auroc"] >= 0.7
    assert metrics["after"]["asr"] < metrics["before"]["asr"]
    assert metrics["after"]["cca"] >= metrics["before"]["cca"] - 0.05


@needs("neural_cleanse")
def test_neural_cleanse_over_every_label(csaw, tmp_path):
    results = defended(
        csaw,
        tmp_path,
        "defense=neural_cleanse",
        "defense.steps=20",
        "defense.samples_per_step=128",
        "defense.label_batch=20",
    )
    detection = results["metrics"]["detection"]
    print("neural_cleanse", results["metrics"]["after"], detection)
    # every label reversed in one label batch; with 20 short steps (the authors allow 1000) the
    # masks have not shrunk enough to single out the target here (measured: nothing flagged)
    assert len(detection["anomaly_index"]) == len(detection["l1_norms"]) == IDENTITIES
    assert min(detection["reverse_success"]) >= 0.99
