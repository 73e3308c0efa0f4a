"""Anti-Backdoor Learning: its losses by hand, a digits run with caching, (slow) Fashion-MNIST."""

from __future__ import annotations

import json
import logging

import pytest
import torch
import torch.nn.functional as F

from bdrun.config import component
from bdrun.defenses.abl import (
    AnchoredUnlearning,
    GradientAscent,
    IsolationLoss,
    MarginUnlearning,
)
from bdrun.errors import BdrunError
from bdrun.runner import run

from conftest import compose_config, needs_fashion_mnist, repair_figures, run_fashion_mnist


def test_isolation_losses_by_hand():
    logits = torch.tensor([[2.0, 0.0], [0.0, 3.0]])
    y = torch.tensor([0, 1])
    ce = F.cross_entropy(logits, y)  # about 0.09: below gamma
    assert float(ce) < 0.5
    lga = IsolationLoss("lga", gamma=0.5, flooding=0.5).loss(logits, y, y, None)
    assert torch.isclose(lga, -ce)  # gradient ascent once the loss is under gamma
    flood = IsolationLoss("flooding", gamma=0.5, flooding=0.5).loss(logits, y, y, None)
    assert torch.isclose(flood, 1.0 - ce)  # |l - b| + b
    high = torch.tensor([[0.0, 2.0], [3.0, 0.0]])  # wrong labels: loss above gamma
    assert torch.isclose(
        IsolationLoss("lga", 0.5, 0.5).loss(high, y, y, None), F.cross_entropy(high, y)
    )
    assert torch.isclose(GradientAscent().loss(logits, y, y, None), -ce)


def test_margin_unlearning_keeps_a_gradient_where_the_softmax_is_saturated():
    logits = torch.tensor([[60.0, 0.0, 10.0], [0.0, 1.0, 3.0]], requires_grad=True)
    y = torch.tensor([0, 1])
    # sample 0: margin 50 (softmax exactly 1 in float32); sample 1 is already misclassified
    margin = MarginUnlearning().loss(logits, y, y, None)
    assert torch.isclose(margin, torch.tensor(25.0))  # mean of max(0, 50) and max(0, -2)
    margin.backward()
    assert logits.grad[0].tolist() == [0.5, 0.0, -0.5] and logits.grad[1].abs().sum() == 0
    saturated = logits.detach()[:1].clone().requires_grad_(True)
    GradientAscent().loss(saturated, y[:1], y[:1], None).backward()
    assert saturated.grad.abs().sum() < 1e-20  # why the margin exists


def test_anchored_unlearning_by_hand():
    # rows 0 and 1 of the training set are the isolated samples, row 5 a clean anchor image
    logits = torch.tensor([[4.0, 1.0], [0.0, 2.0], [3.0, 1.0]])
    y = torch.tensor([0, 1, 1])
    pos = torch.tensor([0, 5, 1])
    hook = AnchoredUnlearning(MarginUnlearning(), forget=2)
    forget = MarginUnlearning().loss(logits[[0, 2]], y[[0, 2]], pos[[0, 2]], None)  # (3 + 0) / 2
    assert torch.isclose(forget, torch.tensor(1.5))
    anchor = F.cross_entropy(logits[1:2], y[1:2])
    assert torch.isclose(hook.loss(logits, y, pos, None), forget + anchor)
    # a batch of anchor images only is plain fine-tuning, one of isolated samples plain unlearning
    assert torch.isclose(hook.loss(logits[1:2], y[1:2], pos[1:2], None), anchor)
    assert torch.isclose(hook.loss(logits[[0, 2]], y[[0, 2]], pos[[0, 2]], None), forget)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"isolation_ratio": 0},
        {"isolation_ratio": 1},
        {"loss": "mse"},
        {"unlearning_lr": 0},
        {"isolation_epochs": -1},
        {"unlearning_loss": "flooding"},
        {"unlearning_stop": 1.0},
        {"unlearning_stop": -0.1},
        {"unlearning_anchor": "test"},
    ],
)
def test_bad_settings_are_user_errors(kwargs):
    with pytest.raises(BdrunError):
        component("defense", "abl", **kwargs)


def test_abl_on_digits_isolates_one_percent_and_caches_every_stage(tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="bdrun")
    cfg = compose_config("defense=abl", "logger=none", "train.epochs=6")
    first = run(cfg, tmp_path / "first")
    d = first["metrics"]["detection"]
    assert d["removed"] == round(0.01 * first["poison"]["train_size"])
    print(f"ABL digits isolation: {d}")
    assert d["precision"] >= 0.5  # digits are easy: clean samples also reach tiny losses
    assert d["isolated_top_label_share"] >= d["precision"]  # the poisons all carry label 0
    stages = [r.getMessage() for r in caplog.records if r.getMessage().startswith("ABL")]
    assert sum("cache miss" in m for m in stages) == 3  # isolation, training on, unlearning
    # digits unlearn against the clean holdout for every epoch (tuning/defense_dataset/abl_digits)
    assert d["unlearning_epochs_run"] == 30 and d["isolated_acc_after"] <= 0.1
    assert first["metrics"]["after"]["asr"] < first["metrics"]["before"]["asr"]

    caplog.clear()
    second = run(cfg, tmp_path / "second")
    stages = [r.getMessage() for r in caplog.records if r.getMessage().startswith("ABL")]
    assert sum("cache hit" in m for m in stages) == 3
    assert second["metrics"]["detection"] == d  # the unlearning record came from the cache
    assert second["metrics"]["after"] == first["metrics"]["after"]
    assert json.loads((tmp_path / "second" / "results.json").read_text())["defense"] == "abl"

    # the authors' unlearning of the isolated samples alone, stopped once they are unlearned:
    # isolation and training on come from the cache, the unlearning is a model of its own
    caplog.clear()
    alone = ["defense.unlearning_anchor=none", "defense.unlearning_stop=0.1"]
    cfg = compose_config("defense=abl", "logger=none", "train.epochs=6", *alone)
    third = run(cfg, tmp_path / "third")["metrics"]["detection"]
    stages = [r.getMessage() for r in caplog.records if r.getMessage().startswith("ABL")]
    assert [m.split("cache ")[-1] for m in stages if "cache" in m] == ["hit", "hit", "miss"]
    assert 1 <= third["unlearning_epochs_run"] <= 30 and third["isolated_acc_after"] <= 0.1


# Issue 5's bar holds for BadNets (measured 2026-11-23, CPU, 6 epochs: precision 0.995, ASR
# 0.27 %, CCA -3.8 points). Not for SIG: under LGA its poisons (median loss 0.20) stay above the
# easy classes' clean samples (trouser 0.008, bag 0.07, sandal 0.10), so the lowest-loss 1 %
# holds no poison (382 trousers, 146 bags, 42 sandals); ABL's premise that poisons are learned
# fastest does not hold on this data. ABL's defaults on this data: docs/defenses/abl.md.
SIG_NOT_ISOLATED = pytest.mark.xfail(strict=True, reason="SIG poisons are not the lowest-loss 1 %")


@pytest.mark.slow
@needs_fashion_mnist
@pytest.mark.parametrize("attack", ["badnets", pytest.param("sig", marks=SIG_NOT_ISOLATED)])
def test_abl_fashion_mnist(attack, tmp_path):
    results = run_fashion_mnist(tmp_path, f"attack={attack}", "defense=abl")
    d, before, after = repair_figures(results)
    print(f"ABL FMNIST {attack}: isolation {d}; before {before}; after {after}")
    assert d["precision"] >= 0.9
    assert after["asr"] <= 0.10
    assert before["cca"] - after["cca"] <= 0.05
