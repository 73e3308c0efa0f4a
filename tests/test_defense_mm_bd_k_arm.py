"""MM-BD's margin statistic and p-value, K-Arm's pre-screening and cost schedule."""

from __future__ import annotations

import math

import pytest
import torch

from bdrun.config import component
from bdrun.defenses.k_arm import Arm, ArmState, pre_screen
from bdrun.defenses.mm_bd import gamma_p_value, margins, max_margins


def test_margin_is_own_logit_minus_the_largest_other():
    logits = torch.tensor([[3.0, 1.0, 2.0], [0.0, 5.0, -1.0]])
    assert margins(logits, torch.tensor([0, 2])).tolist() == [1.0, -6.0]


def test_an_outlying_margin_gets_a_small_p_value_and_a_typical_one_does_not():
    typical = torch.tensor([4.1, 3.8, 4.4, 4.0, 3.6, 4.2, 3.9, 4.3, 3.7, 4.05])
    assert gamma_p_value(typical) > 0.05
    planted = typical.clone()
    planted[3] = 40.0
    p = gamma_p_value(planted)
    assert 0 <= p < 0.05
    assert gamma_p_value(torch.ones(10)) == 1.0  # a degenerate null flags nothing


class Lifts(torch.nn.Module):
    """Logits = the mean pixel x a per-class gain: class 2 has the largest reachable margin."""

    def __init__(self) -> None:
        super().__init__()
        self.gain = torch.nn.Parameter(torch.tensor([1.0, 1.0, 5.0, 1.0]))

    def forward(self, x):
        mean = x.flatten(1).mean(1, keepdim=True)
        return mean * self.gain - (1 - mean) * self.gain.flip(0) * 0


def test_margin_maximisation_finds_the_class_with_the_largest_reachable_margin():
    stats, steps = max_margins(
        Lifts(), (1, 4, 4), 4, 5, 50, 0.5, 0.2, 1e-9, torch.Generator().manual_seed(0)
    )
    assert int(stats.argmax()) == 2 and stats[2] > 3.5
    assert (steps >= 1).all() and (steps <= 50).all()


def test_pre_screening_finds_universal_then_specific_arms():
    # 3 classes, 2 images each; label 2 is in every other image's top 1 (besides its own)
    y = torch.tensor([0, 0, 1, 1, 2, 2])
    logits = torch.tensor(
        [[9, 1, 5], [9, 1, 5], [1, 9, 5], [1, 9, 5], [1, 5, 9], [1, 5, 9]], dtype=torch.float
    )
    arms = pre_screen(logits, y, 3, gamma=0.34, global_theta=0.95, local_theta=0.9)
    assert arms == [Arm(2, (0, 1), "universal")]
    logits[2:4] = torch.tensor([1.0, 9, 0])  # class 1 now puts label 0 second
    arms = pre_screen(logits, y, 3, gamma=0.34, global_theta=0.95, local_theta=0.9)
    assert Arm(0, (1,), "specific") in arms and Arm(2, (0,), "specific") in arms


def test_k_arm_cost_schedule_follows_neural_cleanse():
    karm = component("defense", "k_arm", patience=2, init_cost=1e-3, cost_multiplier=1.5)
    state = ArmState(torch.zeros(1), torch.zeros(1), None)  # type: ignore[arg-type]
    for _ in range(2):
        karm.step_cost(state, True)
    assert state.cost == pytest.approx(1e-3)
    for _ in range(2):
        karm.step_cost(state, True)
    assert state.cost == pytest.approx(1.5e-3)
    for _ in range(2):
        karm.step_cost(state, False)
    assert state.cost == pytest.approx(1.5e-3 / 1.5**1.5)
    assert math.isinf(state.best_l1)
