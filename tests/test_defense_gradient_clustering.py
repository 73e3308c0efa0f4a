"""Gradient clustering: input gradients by hand, the concentration analysis on a planted
cluster, a digits run, and (slow) Fashion-MNIST."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from bdrun.config import component
from bdrun.defenses.gradient_clustering import (
    FIGURE,
    concentration,
    input_gradients,
)
from bdrun.errors import BdrunError
from bdrun.runner import run

from conftest import compose_config, needs_fashion_mnist, repair_figures, run_fashion_mnist


def test_input_gradients_of_a_linear_model_by_hand():
    # logits = W x (x flattened, 2 pixels); d CE / d x = W^T (softmax - onehot)
    model = nn.Sequential(nn.Flatten(), nn.Linear(2, 2, bias=False))
    weight = torch.tensor([[1.0, 0.0], [0.0, 2.0]])
    model[1].weight.data.copy_(weight)
    x = torch.tensor([[[[0.5, 0.25]]], [[[0.0, 0.0]]]])  # [2, 1, 1, 2]
    y = torch.tensor([0, 1])
    grads = input_gradients(model, x, y, batch_size=1)
    for i in range(2):
        probs = torch.softmax(weight @ x[i].flatten(), 0)
        expected = weight.T @ (probs - torch.eye(2)[y[i]])
        torch.testing.assert_close(grads[i].flatten(), expected)
    assert grads.shape == x.shape


def test_concentration_share():
    saliency = np.zeros((10, 10))
    saliency[0, :5] = 1.0  # all the mass in 5 % of the pixels
    assert concentration(saliency, 0.05) == pytest.approx(1.0)
    assert concentration(np.ones((10, 10)), 0.05) == pytest.approx(0.05)
    assert concentration(np.zeros((4, 4)), 0.25) == 0.0


def planted(n_poison: int, n_clean: int, side: int = 8):
    """Unit-norm |gradient| rows: poisons concentrated on a 2x2 corner, clean spread out."""
    rng = np.random.default_rng(0)
    clean = rng.random((n_clean, side * side))
    poison = np.zeros((n_poison, side, side))
    poison[:, :2, :2] = 1 + rng.random((n_poison, 2, 2))
    poison = poison.reshape(n_poison, side * side) + 0.01 * rng.random((n_poison, side * side))
    feats = np.concatenate([poison, clean])
    return feats / np.linalg.norm(feats, axis=1, keepdims=True)


def test_concentration_analysis_flags_the_planted_cluster():
    gc = component("defense", "gradient_clustering", analysis="concentration", features="abs")
    gc._shape = (1, 8, 8)
    feats = planted(40, 60)
    assigned = np.array([0] * 40 + [1] * 60)
    assert gc._flag(feats[:, :2], assigned, np.zeros(0, dtype=int), 0, feats) == [0]
    # two clusters of clean rows: neither is concentrated
    clean = planted(0, 100)
    assert gc._flag(clean[:, :2], assigned, np.zeros(0, dtype=int), 0, clean) == []


def test_clustering_separates_the_planted_poisons():
    gc = component("defense", "gradient_clustering", analysis="holdout")
    feats = planted(40, 60)
    labels = np.zeros(100, dtype=int)
    reference = planted(0, 30)  # clean holdout rows of the same label
    removed, classes = gc.cluster_classes(feats, labels, reference, np.zeros(30, dtype=int), 0)
    assert removed[:40].all() and not removed[40:].any()
    assert classes[0].flagged and classes[0].label == 0


@pytest.mark.parametrize(
    "kwargs",
    [
        {"analysis": "largest"},
        {"concentration_area": 0.0},
        {"concentration_area": 1.0},
        {"concentration_ratio": 0.5},
        {"dims": 0},
        {"features": "raw"},
    ],
)
def test_bad_settings_are_user_errors(kwargs):
    with pytest.raises(BdrunError):
        component("defense", "gradient_clustering", **kwargs)


def test_gradient_clustering_on_digits(tmp_path):
    # measured (2026-12-02): precision 0.98, recall 1.0, ASR 100 % -> 0 %, CCA 98.5 -> 98.3 %
    cfg = compose_config("defense=gradient_clustering", "logger=none")
    results = run(cfg, tmp_path)
    d = results["metrics"]["detection"]
    assert {"precision", "recall", "removed", "flagged_classes"} <= set(d)
    assert d["precision"] >= 0.9 and d["recall"] >= 0.9
    assert d["flagged_classes"] == [cfg.attack.target]
    assert results["metrics"]["after"]["asr"] <= 0.1
    assert (tmp_path / FIGURE).stat().st_size > 0


@pytest.mark.slow
@needs_fashion_mnist
def test_gradient_clustering_fashion_mnist_badnets(tmp_path):
    results = run_fashion_mnist(tmp_path, "attack=badnets", "defense=gradient_clustering")
    d, before, after = repair_figures(results)
    print(f"gradient clustering FMNIST BadNets: {d}; before {before}; after {after}")
    assert d["recall"] >= 0.9
    assert after["asr"] <= 0.05
