"""Neural Cleanse: MAD outlier test, the authors' cost schedule, label-batched reversal."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
from torch import nn

from bdrun.config import component
from bdrun.defenses.anomaly import flagged_labels, mad_anomaly_index
from bdrun.defenses.trigger_reversal import ReversalSettings, _Schedule, reverse_triggers
from bdrun.errors import BdrunError


def test_mad_anomaly_index_matches_a_hand_computation():
    l1 = torch.tensor([1.0, 10.0, 11.0, 12.0, 13.0])
    index, median, mad = mad_anomaly_index(l1)
    # median 11; |l1 - 11| = 10, 1, 0, 1, 2 -> median 1 -> MAD = 1.4826
    assert median == 11 and mad == pytest.approx(1.4826)
    assert index.tolist() == pytest.approx([10 / 1.4826, 1 / 1.4826, 0, -1 / 1.4826, -2 / 1.4826])
    assert flagged_labels(index, torch.arange(5)) == [0]
    # large norms are never flagged, however far out (only small triggers reveal a backdoor)
    far_high = torch.tensor([10.0, 10.5, 11.0, 11.5, 90.0])
    assert flagged_labels(mad_anomaly_index(far_high)[0], torch.arange(5)) == []


def test_mad_median_is_numpys_for_an_even_count_and_zero_mad_flags_nothing():
    l1 = torch.tensor([4.0, 1.0, 9.0, 7.0])
    _, median, mad = mad_anomaly_index(l1)
    assert median == pytest.approx(np.median(l1.numpy()))
    assert mad == pytest.approx(1.4826 * np.median(np.abs(l1.numpy() - np.median(l1.numpy()))))
    index, _, mad = mad_anomaly_index(torch.full((6,), 3.0))
    assert mad == 0 and index.abs().max() == 0


def test_flagged_labels_come_largest_index_first():
    index = torch.tensor([2.5, 0.1, 7.0, -3.0, 2.0])
    assert flagged_labels(index, torch.tensor([10, 11, 12, 13, 14])) == [12, 10]


def reversal(**changes) -> ReversalSettings:
    """neural_cleanse.yaml's reversal settings with `changes`."""
    return dataclasses.replace(component("defense", "neural_cleanse").settings, **changes)


def test_cost_schedule_follows_the_authors_rules_per_label():
    s = reversal(init_cost=1e-3, patience=5, cost_multiplier=2.0)
    schedule = _Schedule(2, s)
    active = torch.ones(2, dtype=torch.bool)
    acc = torch.tensor([1.0, 0.0], dtype=torch.float64)  # label 0 always succeeds, 1 never
    for step in range(5):
        reg = torch.tensor([10.0 - step, 5.0], dtype=torch.float64)
        improved, stopped = schedule.update(active, acc, reg)
        assert improved.tolist() == [True, False] and not stopped.any()
    # five successes at cost 0 start the cost; the failing label stays at 0
    assert schedule.cost.tolist() == [1e-3, 0.0]
    assert schedule.best_reg[0] == 6.0 and torch.isinf(schedule.best_reg[1])
    # the step that started the cost already counted as the first success at it (as in the
    # authors' loop), so four more make five: cost x2
    for _ in range(3):
        schedule.update(active, acc, torch.tensor([9.0, 5.0], dtype=torch.float64))
    assert schedule.cost[0] == 1e-3
    schedule.update(active, acc, torch.tensor([9.0, 5.0], dtype=torch.float64))
    assert schedule.cost[0] == pytest.approx(2e-3)
    assert schedule.up_flag.tolist() == [True, False]
    assert schedule.down_flag.tolist() == [False, True]  # 5 failing steps: down (0 stays 0)
    # failing 5 times divides by 2 ** 1.5 and sets the down flag
    for _ in range(5):
        schedule.update(active, torch.tensor([0.0, 0.0], dtype=torch.float64), torch.ones(2))
    assert schedule.cost[0] == pytest.approx(2e-3 / 2**1.5) and schedule.down_flag[0]


class PatchBackdooredLinear(nn.Module):
    """A linear classifier on 8x8 images plus a hand-made backdoor: a bright 2x2 patch in the
    corner pushes class `target` up strongly."""

    def __init__(self, target: int = 3, classes: int = 6) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.weight = nn.Parameter(torch.randn(classes, 64, generator=g) * 0.3)
        self.target = target

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits = x.flatten(1) @ self.weight.T
        patch = x[:, 0, 6:8, 6:8].mean((1, 2))
        bump = torch.zeros_like(logits)
        bump[:, self.target] = 40 * patch
        return logits + bump


def test_label_batched_reversal_finds_the_small_planted_trigger():
    model = PatchBackdooredLinear(target=3)
    x = torch.rand(200, 1, 8, 8) * 0.3
    settings = reversal(steps=80, samples_per_step=128, label_batch=4)
    triggers = reverse_triggers(
        model, x, torch.arange(6), settings, torch.Generator().manual_seed(1)
    )
    assert triggers.masks.shape == (6, 1, 8, 8) and triggers.patterns.shape == (6, 1, 8, 8)
    assert triggers.masks.min() >= 0 and triggers.masks.max() <= 1
    assert int(triggers.l1.argmin()) == 3
    assert triggers.success[3] >= 0.99
    index, _, _ = mad_anomaly_index(triggers.l1)
    assert flagged_labels(index, triggers.labels) == [3]
    # the reversed trigger flips clean inputs to the target on its own
    stamped = triggers.stamp(x, torch.full((len(x),), 3))
    assert (model(stamped).argmax(1) == 3).float().mean() >= 0.95
    assert all(p.requires_grad for p in model.parameters())  # weights frozen only while reversing


@pytest.mark.parametrize(
    "settings, message",
    [
        ({"mitigation": "retrain"}, "defense.mitigation='retrain'"),
        ({"steps": 0}, "defense.steps=0"),
        ({"unlearn_fraction": 1.5}, "defense.unlearn_fraction=1.5"),
        ({"init_costs": 1}, "defense.init_costs"),
    ],
)
def test_bad_settings_are_user_errors(settings, message):
    with pytest.raises(BdrunError, match=message.replace("(", r"\(")):
        component("defense", "neural_cleanse", **settings)


def test_labels_per_pass_defaults_by_device_and_bad_values_are_user_errors():
    auto = reversal()
    assert auto.labels_per_pass(torch.device("cpu")) == 1
    assert auto.labels_per_pass(torch.device("cuda")) == 16
    assert reversal(label_batch=4).labels_per_pass(torch.device("cpu")) == 4
    for bad in (0, -2, "two"):
        with pytest.raises(BdrunError, match="defense.label_batch"):
            component("defense", "neural_cleanse", label_batch=bad)
