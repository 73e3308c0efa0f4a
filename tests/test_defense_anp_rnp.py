"""ANP and RNP: the BatchNorm mask machinery by hand, determinism, bad values, digits runs."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from bdrun.config import component
from bdrun.data.base import ImageSet
from bdrun.defenses.anp import anp_loss, perturbation_step
from bdrun.defenses.bn_masks import (
    bn_channels,
    largest_within,
    prune_channels,
    pruned_at,
    scaled_forward,
    threshold_grid,
)
from bdrun.errors import BdrunError
from bdrun.models.small_cnn import SmallCNN
from bdrun.rng import generator
from bdrun.runner import run

from conftest import compose_config


class Ctx:
    """The RunContext tools mask learning uses."""

    seed = 0
    device = torch.device("cpu")

    def __init__(self) -> None:
        self.figures: dict = {}

    def generator(self, stream: str) -> torch.Generator:
        return generator(self.seed, stream)

    def track(self, iterable, description, total=None):
        return iterable

    def record(self, **figures) -> None:
        self.figures.update(figures)


def bn_model() -> SmallCNN:
    torch.manual_seed(0)
    return SmallCNN((1, 8, 8), 10, batch_norm=True, width=8, hidden=16).eval()


class Tiny(nn.Module):
    """BatchNorm1d(2) then a linear head: small enough to write its output by hand."""

    def __init__(self) -> None:
        super().__init__()
        self.bn = nn.BatchNorm1d(2)
        self.head = nn.Linear(2, 2)
        with torch.no_grad():
            self.bn.weight.copy_(torch.tensor([2.0, -1.0]))
            self.bn.bias.copy_(torch.tensor([0.5, 1.0]))
            self.head.weight.copy_(torch.tensor([[1.0, 2.0], [-1.0, 0.5]]))
            self.head.bias.zero_()

    def forward(self, x):
        return self.head(self.bn(x))

    def by_hand(self, x, weight_scale, bias_scale):
        """The eval-mode output with gamma * weight_scale and beta * bias_scale."""
        xhat = x / math.sqrt(1 + self.bn.eps)  # running mean 0, running var 1
        gamma = self.bn.weight.detach() * weight_scale
        beta = self.bn.bias.detach() * bias_scale
        return (gamma * xhat + beta) @ self.head.weight.detach().T


X = torch.tensor([[1.0, -2.0], [0.5, 3.0], [-1.0, 0.0]])
Y = torch.tensor([0, 1, 1])


def test_a_scaled_forward_multiplies_each_channels_gamma_and_beta():
    model = Tiny().eval()
    channels = bn_channels(model, "anp")
    assert channels.names == ("bn",) and channels.total == 2
    w, b = torch.tensor([0.3, 1.5]), torch.tensor([2.0, 0.0])
    assert torch.allclose(scaled_forward(model, channels, X, w, b), model.by_hand(X, w, b))
    assert torch.allclose(scaled_forward(model, channels, X, torch.ones(2)), model(X))
    assert torch.equal(model.bn.weight, torch.tensor([2.0, -1.0]))  # the module is unchanged


def test_the_perturbation_starts_uniform_and_ascends_the_clean_loss_by_signed_steps():
    model = Tiny().eval()
    channels = bn_channels(model, "anp")
    mask = torch.tensor([1.0, 0.6], requires_grad=True)
    noise = torch.zeros(2, requires_grad=True)
    noise_bias = torch.zeros(2, requires_grad=True)
    eps = 0.4
    perturbation_step(model, channels, X, Y, mask, noise, noise_bias, eps, 1, generator(0, "t"))
    replay = generator(0, "t")
    start = torch.empty(2).uniform_(-eps, eps, generator=replay)
    start_bias = torch.empty(2).uniform_(-eps, eps, generator=replay)
    w, b = start.clone().requires_grad_(), start_bias.clone().requires_grad_()
    loss = F.cross_entropy(model.by_hand(X, mask.detach() + w, 1 + b), Y)
    grad_w, grad_b = torch.autograd.grad(loss, (w, b))
    assert torch.allclose(noise.detach(), start + eps * grad_w.sign())
    assert torch.allclose(noise_bias.detach(), start_bias + eps * grad_b.sign())
    after = F.cross_entropy(model.by_hand(X, mask.detach() + noise.detach(), 1 + noise_bias), Y)
    assert after > loss  # ascent: the perturbation makes the clean loss worse
    assert noise.abs().max() <= 2 * eps  # not clipped back to eps, as the authors' code


def test_the_mask_loss_weighs_the_natural_and_the_perturbed_loss_by_alpha():
    model = Tiny().eval()
    channels = bn_channels(model, "anp")
    mask = torch.tensor([0.9, 0.2])
    noise, noise_bias = torch.tensor([0.1, -0.3]), torch.tensor([0.2, 0.05])
    natural = F.cross_entropy(model.by_hand(X, mask, 1.0), Y)
    perturbed = F.cross_entropy(model.by_hand(X, mask + noise, 1 + noise_bias), Y)
    loss, _ = anp_loss(model, channels, X, Y, mask, noise, noise_bias, 0.2)
    assert torch.isclose(loss, 0.2 * natural + 0.8 * perturbed)
    alone, _ = anp_loss(model, channels, X, Y, mask, None, None, 0.2)
    assert torch.isclose(alone, 0.2 * natural)


def test_pruning_zeroes_the_gamma_of_a_copy_and_the_grid_is_the_authors():
    model = bn_model()
    channels = bn_channels(model, "anp")
    assert channels.names == ("bn1", "bn2") and channels.sizes == (8, 16)
    masks = torch.linspace(0, 1, channels.total)
    pruned = pruned_at(masks, 0.2)
    assert int(pruned.sum()) == int((masks <= 0.2 + 1e-9).sum()) == 5
    out = prune_channels(model, channels, pruned)
    assert torch.equal(out.bn1.weight[:5], torch.zeros(5))
    assert torch.equal(out.bn1.weight[5:], model.bn1.weight[5:])
    assert torch.equal(out.bn1.bias, model.bn1.bias)  # beta stays, as the authors' pruning
    assert bool((model.bn1.weight != 0).all())  # the given model is left alone
    grid = threshold_grid(0.9, 0.05)
    assert len(grid) == 19 and grid[0] == 0 and grid[-1] == 0.9 and 0.2 in grid


def test_the_holdout_selection_takes_the_largest_threshold_within_the_bound():
    grid = [0.0, 0.05, 0.1, 0.15]
    assert largest_within(grid, [0.95, 0.90, 0.96, 0.80], 0.99, 0.04) == 0.1
    assert largest_within(grid, [0.95, 0.95, 0.95, 0.95], 0.99, 0.04) == 0.15  # 0.99 - 0.04
    assert largest_within(grid, [0.90, 0.90, 0.90, 0.90], 0.99, 0.04) is None


def holdout(n: int = 64) -> ImageSet:
    g = generator(1, "holdout")
    return ImageSet(torch.rand(n, 1, 8, 8, generator=g), torch.randint(0, 10, (n,), generator=g))


@pytest.mark.parametrize(
    ("name", "overrides"),
    [("anp", {"iterations": 5}), ("rnp", {"unlearning_epochs": 2, "recovering_epochs": 2})],
)
def test_masks_are_in_the_unit_interval_and_the_same_for_the_same_seed(name, overrides):
    defense = component("defense", name, **overrides)
    model = bn_model()
    channels = bn_channels(model, name)
    first = defense.learn_masks(model, channels, holdout(), Ctx())
    again = defense.learn_masks(model, channels, holdout(), Ctx())
    assert first.shape == (channels.total,)
    assert bool(((first >= 0) & (first <= 1)).all())
    assert torch.equal(first, again)
    assert not torch.equal(first, torch.ones_like(first))  # the masks moved
    assert torch.equal(model.bn1.weight, bn_model().bn1.weight)  # the model did not


@pytest.mark.parametrize("name", ["anp", "rnp"])
def test_a_model_without_batch_norm_is_a_one_line_error(name):
    torch.manual_seed(0)
    plain = SmallCNN((1, 8, 8), 10, width=8, hidden=16)
    with pytest.raises(BdrunError, match=f"^defense={name} .* use model=small_cnn_bn"):
        component("defense", name).repair(plain, None, Ctx())


@pytest.mark.parametrize(
    ("name", "overrides", "message"),
    [
        ("anp", {"eps": 1.5}, r"^defense.eps=1.5 must be in \[0, 1\]"),
        ("anp", {"eps": -0.1}, r"^defense.eps=-0.1 must be in \[0, 1\]"),
        ("anp", {"steps": 0}, r"^defense.steps=0 must be >= 1"),
        ("anp", {"lr": -0.2}, r"^defense.lr=-0.2 must be > 0"),
        ("anp", {"iterations": 0}, r"^defense.iterations=0 must be >= 1"),
        ("anp", {"alpha": 1.2}, r"^defense.alpha=1.2 must be a fraction"),
        ("anp", {"momentum": -1}, r"defense.momentum"),
        ("anp", {"selection": "test_asr"}, r"^defense.selection='test_asr' must be one of"),
        ("anp", {"threshold": 2}, r"^defense.threshold=2 must be a fraction"),
        ("anp", {"acc_drop": -0.1}, r"^defense.acc_drop=-0.1 must be a fraction"),
        ("anp", {"pruning_step": 0}, r"^defense.pruning_step=0 gives no thresholds"),
        ("anp", {"clean_samples": 5}, r"^defense.clean_samples=5 must be >= 20"),
        ("anp", {"batch_size": 1}, r"^defense.batch_size=1 must be >= 2"),
        ("rnp", {"crop_padding": -1}, r"^defense.crop_padding=-1 must be >= 0"),
        ("rnp", {"clean_threshold": 1.5}, r"^defense.clean_threshold=1.5 must be a fraction"),
        ("rnp", {"unlearning_lr": 0}, r"^defense.unlearning_lr=0.0 must be > 0"),
        ("rnp", {"recovering_lr": -1}, r"^defense.recovering_lr=-1.0 must be > 0"),
        ("rnp", {"unlearning_epochs": 0}, r"^defense.unlearning_epochs=0 must be >= 1"),
        ("rnp", {"recovering_epochs": 0}, r"^defense.recovering_epochs=0 must be >= 1"),
        ("rnp", {"alpha": 0}, r"^defense.alpha=0.0 must be > 0"),
        ("rnp", {"weight_decay": -1}, r"defense.weight_decay"),
    ],
)
def test_bad_values_end_in_one_line(name, overrides, message):
    with pytest.raises(BdrunError, match=message):
        component("defense", name, **overrides)


def test_too_small_a_holdout_is_a_one_line_error():
    defense = component("defense", "rnp")
    with pytest.raises(BdrunError, match="at least 20 clean holdout images .*holdout_fraction"):
        defense.clean_set(holdout(10), Ctx())


@pytest.mark.slow  # 80 s on 2 loaded cores, most of it the poisoned model's training
def test_anp_removes_most_of_a_digits_badnets_backdoor_and_keeps_clean_accuracy(tmp_path):
    # the authors' settings but 400 mask updates (2,000 take minutes on 2 loaded cores)
    cfg = compose_config(
        "model=small_cnn_bn", "defense=anp", "logger=none", "defense.iterations=400"
    )
    results = run(cfg, tmp_path)
    before, after = results["metrics"]["before"], results["metrics"]["after"]
    figures = results["metrics"]["detection"]
    assert before["asr"] > 0.9
    assert after["asr"] < before["asr"] - 0.5
    assert after["cca"] > before["cca"] - 0.1
    assert figures["pruned_channels"] > 0 and figures["clean_samples_used"] == 126
    assert (tmp_path / "pruning_curve_anp.csv").is_file()
    assert (tmp_path / "bn_masks_anp.csv").is_file()
