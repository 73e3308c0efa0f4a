"""Spectral signatures: scores on synthetic representations, a digits run, and (slow) Fashion-MNIST."""

from __future__ import annotations

import pytest
import torch

from bdrun.config import component
from bdrun.defenses.spectral import outlier_scores, top_per_class
from bdrun.errors import BdrunError
from bdrun.runner import run

from conftest import compose_config, needs_fashion_mnist, repair_figures, run_fashion_mnist


def synthetic(poison_share: float, n: int = 400, dim: int = 16):
    """Class 0 holds `poison_share` poisons shifted along one axis; class 1 is clean."""
    g = torch.Generator().manual_seed(0)
    feats = torch.randn(2 * n, dim, generator=g)
    labels = torch.cat([torch.zeros(n), torch.ones(n)]).long()
    poison = torch.zeros(2 * n, dtype=torch.bool)
    poison[: round(poison_share * n)] = True
    feats[poison, 3] += 8.0
    reference = torch.randn(100, dim, generator=g)
    reference_labels = torch.cat([torch.zeros(50), torch.ones(50)]).long()
    return feats, labels, poison, reference, reference_labels


def recall_at(scores: torch.Tensor, poison: torch.Tensor, count: int) -> float:
    return float(poison[scores.topk(count).indices].float().sum() / poison.sum())


def test_few_poisons_stand_out_with_either_centre():
    feats, labels, poison, ref, ref_labels = synthetic(0.1)
    budget = round(1.5 * int(poison.sum()))
    by_class = outlier_scores(feats, labels, ref, ref_labels, "class", min_reference=10)
    by_holdout = outlier_scores(feats, labels, ref, ref_labels, "holdout", min_reference=10)
    # in units of the class's own spread a poison scores at most about (1 - eps) / eps = 9,
    # which a few clean samples of the other class reach; from the clean centre it is 64
    assert recall_at(by_class, poison, budget) >= 0.95
    assert recall_at(by_holdout, poison, budget) == 1.0


def test_half_poisoned_class_needs_the_clean_centre():
    # the class mean sits between the two groups: both score alike (the paper's centring)
    feats, labels, poison, ref, ref_labels = synthetic(0.5)
    budget = round(1.5 * int(poison.sum()))
    by_class = outlier_scores(feats, labels, ref, ref_labels, "class", min_reference=10)
    by_holdout = outlier_scores(feats, labels, ref, ref_labels, "holdout", min_reference=10)
    assert recall_at(by_class, poison, budget) < 0.9
    assert recall_at(by_holdout, poison, budget) == 1.0
    # too few clean samples of a class: the class mean is used instead
    fallback = outlier_scores(feats, labels, ref, ref_labels, "holdout", min_reference=51)
    assert torch.allclose(fallback, by_class)


def test_top_per_class_takes_the_share_of_every_class():
    scores = torch.arange(10.0)
    labels = torch.tensor([0] * 4 + [1] * 6)
    removed = top_per_class(scores, labels, 0.5)
    assert removed.tolist() == [False, False, True, True] + [False] * 3 + [True] * 3


@pytest.mark.parametrize(
    "kwargs",
    [
        {"centre": "median"},
        {"scope": "all"},
        {"removal_factor": 0},
        {"expected_poison_rate": 0},
        {"expected_poison_rate": 1.5},
        {"expected_poison_rate": None},
        {"expected_poison_rate": "a tenth"},
    ],
)
def test_bad_settings_are_user_errors(kwargs):
    with pytest.raises(BdrunError, match=f"defense.{next(iter(kwargs))}="):
        component("defense", "spectral", **kwargs)


def test_the_expected_poison_rate_is_the_defenders_own(tmp_path):
    # Tran et al.'s epsilon is a defense parameter (default 0.1): an attack poisoning 5 % does
    # not change how many samples are removed
    results = run(
        compose_config("defense=spectral", "attack.poison_rate=0.05", "debug=smoke", "logger=none"),
        tmp_path,
    )
    n = results["poison"]["train_size"]
    assert results["metrics"]["detection"]["removed"] == round(1.5 * 0.1 * n)


def test_spectral_on_digits_removes_poisons_and_retrains(tmp_path):
    results = run(compose_config("defense=spectral", "logger=none", "train.epochs=8"), tmp_path)
    d = results["metrics"]["detection"]
    n = results["poison"]["train_size"]
    assert d["removed"] == round(1.5 * 0.1 * n)
    # digits: ~10 clean holdout samples per class estimate the centre (measured recall 0.81)
    assert d["recall"] >= 0.7
    assert results["metrics"]["after"]["asr"] < results["metrics"]["before"]["asr"]


@pytest.mark.slow
@needs_fashion_mnist
def test_spectral_fashion_mnist_badnets(tmp_path):
    results = run_fashion_mnist(tmp_path, "attack=badnets", "defense=spectral")
    d, before, after = repair_figures(results)
    print(f"spectral FMNIST BadNets: {d}; before {before}; after {after}")
    assert d["recall"] >= 0.9
    assert after["asr"] <= 0.05
    assert before["cca"] - after["cca"] <= 0.02
