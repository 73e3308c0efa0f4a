"""Suppression: the voting wrapper by hand and a digits run."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from bdrun.config import component
from bdrun.defenses.suppression import VotingClassifier
from bdrun.errors import BdrunError
from bdrun.runner import run

from conftest import compose_config


class BrightnessClassifier(nn.Module):
    """Class 1 when the mean pixel is above 0.5, else class 0; counts its calls."""

    def __init__(self) -> None:
        super().__init__()
        self.calls = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        m = x.flatten(1).mean(1, keepdim=True)
        return torch.cat([0.5 - m, m - 0.5], 1)


def test_votes_count_replicas_and_follow_the_model_without_noise():
    model = BrightnessClassifier()
    x = torch.cat([torch.full((3, 1, 4, 4), 0.2), torch.full((2, 1, 4, 4), 0.9)])
    votes = VotingClassifier(model, replicas=7, noise=0.0, distribution="uniform", seed=0)(x)
    assert votes.shape == (5, 2)
    assert torch.equal(votes.sum(1), torch.full((5,), 7.0))
    assert votes.argmax(1).tolist() == [0, 0, 0, 1, 1]


def test_noise_sways_borderline_inputs_only_and_is_reproducible():
    x = torch.cat([torch.full((1, 1, 8, 8), 0.52), torch.full((1, 1, 8, 8), 0.95)])
    voter = VotingClassifier(BrightnessClassifier(), 21, 0.5, "uniform", seed=0)
    votes = voter(x)
    assert 0 < votes[0, 0] < 21  # near the boundary the replicas disagree
    assert votes[1, 1] == 21  # far from it they do not
    assert torch.equal(votes, voter(x))  # a fresh seeded generator per call


def test_all_replicas_of_a_chunk_share_one_forward_pass():
    model = BrightnessClassifier()
    voter = VotingClassifier(model, 10, 0.1, "gaussian", seed=0, images_per_pass=40)
    voter(torch.rand(8, 1, 4, 4))
    assert model.calls == 2  # 4 inputs x 10 replicas per pass


@pytest.mark.parametrize("kwargs", [{"replicas": 0}, {"noise": -0.1}, {"distribution": "laplace"}])
def test_bad_settings_are_user_errors(kwargs):
    with pytest.raises(BdrunError):
        component("defense", "suppression", **kwargs)


def test_suppression_on_digits(tmp_path):
    # without noise every replica votes like the model: the pipeline's figures must not move
    exact = run(
        compose_config("defense=suppression", "defense.noise=0", "logger=none", "train.epochs=8"),
        tmp_path / "exact",
    )
    assert exact["metrics"]["after"] == exact["metrics"]["before"]
    noisy = run(
        compose_config("defense=suppression", "logger=none", "train.epochs=8"), tmp_path / "noisy"
    )
    before, after = noisy["metrics"]["before"], noisy["metrics"]["after"]
    assert after["cca"] >= before["cca"] - 0.05
