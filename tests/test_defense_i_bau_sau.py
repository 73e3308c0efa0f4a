"""I-BAU and SAU: the norm balls, the implicit hypergradient and SAU's losses by hand, bad
settings, and runs on a digits BadNets model with BatchNorm (small_cnn_bn)."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from bdrun.config import component
from bdrun.data.base import ImageSet, to_float
from bdrun.defenses.i_bau import fixed_point_hypergradient
from bdrun.defenses.sau import jensen_shannon, shared_loss
from bdrun.errors import BdrunError
from bdrun.models.probes import project_perturbation
from bdrun.models.small_cnn import SmallCNN
from bdrun.runner import prepare

from conftest import compose_config


def test_projection_onto_the_linf_and_l2_balls_by_hand():
    delta = torch.tensor([[3.0, -4.0], [0.3, 0.4]]).view(2, 1, 1, 2)
    clipped = project_perturbation(delta, "linf", 0.5).flatten(1)
    torch.testing.assert_close(clipped, torch.tensor([[0.5, -0.5], [0.3, 0.4]]))
    # row 0 has L2 norm 5: scaled to 1; row 1 (norm 0.5) is inside the ball and stays
    projected = project_perturbation(delta, "l2", 1.0).flatten(1)
    torch.testing.assert_close(projected, torch.tensor([[0.6, -0.8], [0.3, 0.4]]))


def test_the_hypergradient_of_a_quadratic_inner_problem_by_hand():
    # inner: 1/2 |delta - theta|^2, so Phi = delta - lr (delta - theta): dPhi/ddelta = (1 - lr) I,
    # dPhi/dtheta = lr I and the fixed point is delta* = theta. outer: c . delta + |theta|^2.
    # K iterations: v = sum_{j<K} (1 - lr)^j c, gradient = 2 theta + lr v
    #             = 2 theta + (1 - (1 - lr)^K) c  (-> 2 theta + c, the exact one, as K grows)
    theta = torch.tensor([1.0, -2.0, 0.5], requires_grad=True)
    c = torch.tensor([3.0, 1.0, -1.0])

    def inner(delta):
        return 0.5 * (delta - theta).pow(2).sum()

    def outer(delta):
        return (c * delta).sum() + theta.pow(2).sum()

    delta = theta.detach().clone()
    for k, lr in [(1, 0.5), (3, 0.5), (5, 0.1)]:
        (grad,), loss = fixed_point_hypergradient(delta, [theta], inner, outer, k, lr)
        expected = 2 * theta.detach() + (1 - (1 - lr) ** k) * c
        torch.testing.assert_close(grad, expected)
        assert float(loss) == pytest.approx(float(outer(delta).detach()))


def tiny_model() -> SmallCNN:
    with torch.random.fork_rng():
        torch.manual_seed(0)
        return SmallCNN((1, 8, 8), 10, batch_norm=True, width=4, hidden=8).eval()


def test_the_universal_perturbation_stays_in_its_l2_ball_and_raises_the_loss():
    model = tiny_model()
    x = torch.rand(30, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    predicted = model(x).argmax(1)
    for bound in (0.5, 2.0):
        ibau = component("defense", "i_bau", l2_bound=bound, batch_size=10, pert_lr=1.0)
        delta = ibau.universal_perturbation(model, x)
        assert delta.shape == (1, 1, 8, 8)
        assert float(delta.norm()) <= bound * (1 + 1e-5)
        before = F.cross_entropy(model(x), predicted)
        assert F.cross_entropy(model((x + delta).clamp(0, 1)), predicted) > before


@pytest.mark.parametrize("norm, bound", [("linf", 0.2), ("l2", 0.5)])
def test_shared_pgd_keeps_every_image_in_its_ball(norm, bound):
    model, original = tiny_model(), tiny_model()
    with torch.no_grad():
        original.classifier.bias[3] += 1.0  # another model than the one repaired
    x = torch.rand(16, 1, 8, 8, generator=torch.Generator().manual_seed(1))
    y = torch.randint(0, 10, (16,), generator=torch.Generator().manual_seed(2))
    sau = component("defense", "sau", norm=norm, bound=bound, init="random")
    delta = sau.shared_pgd(model, original, x, y, torch.Generator().manual_seed(3))
    assert delta.shape == x.shape
    size = delta.flatten(1).abs().amax(1) if norm == "linf" else delta.flatten(1).norm(dim=1)
    assert bool((size <= bound * (1 + 1e-5)).all()) and float(size.max()) > 0.5 * bound


def test_jensen_shannon_and_the_shared_loss_by_hand():
    same = torch.tensor([[1.0, 2.0, 0.5]])
    assert float(jensen_shannon(same, same)) == pytest.approx(0.0, abs=1e-7)
    # two distributions with disjoint support: JS = log 2
    apart = jensen_shannon(torch.tensor([[30.0, -30.0]]), torch.tensor([[-30.0, 30.0]]))
    assert float(apart) == pytest.approx(math.log(2), rel=1e-4)
    # p = softmax([0, log 3]) = [1/4, 3/4]; the original's label 1: -(log(1/4) + log(1/4)) / 2
    logits = torch.tensor([[0.0, math.log(3.0)], [0.0, 0.0]])
    loss = shared_loss(logits, torch.tensor([1, 0]), torch.tensor([True, False]))
    assert float(loss) == pytest.approx(math.log(4), rel=1e-4)


@pytest.mark.parametrize(
    "name, kwargs",
    [
        ("i_bau", {"lr": -1e-3}),
        ("i_bau", {"n_rounds": 0}),
        ("i_bau", {"K": 0}),
        ("i_bau", {"batch_size": 0}),
        ("i_bau", {"perturbed_share": 1.5}),
        ("i_bau", {"l2_bound": 0}),
        ("i_bau", {"pert_lr": 0}),
        ("i_bau", {"optimizer": "rmsprop"}),
        ("sau", {"lr": 0}),
        ("sau", {"bound": 2.0}),
        ("sau", {"bound": -0.1}),
        ("sau", {"steps": 0}),
        ("sau", {"n_rounds": 0}),
        ("sau", {"norm": "l1"}),
        ("sau", {"init": "ones"}),
        ("sau", {"lmd_3": -1}),
        ("sau", {"weight_decay": -1}),
    ],
)
def test_bad_settings_are_one_line_errors_naming_the_value(name, kwargs):
    ((key, value),) = kwargs.items()
    with pytest.raises(BdrunError, match=f"defense.{key}") as error:
        component("defense", name, **kwargs)
    assert "\n" not in str(error.value) and str(value) in str(error.value)


@pytest.mark.parametrize("name", ["i_bau", "sau"])
def test_a_holdout_smaller_than_the_label_count_is_a_user_error(name):
    ctx = SimpleNamespace(info=SimpleNamespace(num_classes=10), device=torch.device("cpu"))
    data = SimpleNamespace(holdout=ImageSet(torch.rand(5, 1, 8, 8), torch.arange(5)))
    with pytest.raises(BdrunError, match="at least 10 clean holdout images"):
        component("defense", name).repair(tiny_model(), data, ctx)


@pytest.fixture(scope="module")
def digits_bn(tmp_path_factory):
    """The digits BadNets model with BatchNorm (seed 0) and its run's context."""
    return prepare(
        compose_config("model=small_cnn_bn", "logger=none"), tmp_path_factory.mktemp("digits")
    )


def repaired(prepared, name: str, **kwargs):
    ctx = prepared.ctx.for_defense()
    saved = {k: v.clone() for k, v in prepared.model.state_dict().items()}
    model = component("defense", name, **kwargs).repair(prepared.model, prepared.data, ctx)
    for key, value in prepared.model.state_dict().items():
        assert torch.equal(value, saved[key]), "repair modified the given model"
    return model, ctx


def test_sau_unlearns_the_digits_backdoor_where_the_same_training_without_it_does_not(digits_bn):
    # the authors' lr 1e-4 moves a model little in the 100 steps that one batch of the digits
    # holdout gives (docs/defenses/i_bau_sau.md); the mechanism is checked at 2e-3
    before = digits_bn.ctx.evaluate(digits_bn.model)
    assert before["asr"] > 0.95
    model, ctx = repaired(digits_bn, "sau", lr=2e-3, n_rounds=10)
    plain, _ = repaired(digits_bn, "sau", lr=2e-3, n_rounds=10, lmd_3=0.0)
    after, without = ctx.evaluate(model), ctx.evaluate(plain)
    assert after["asr"] < before["asr"] - 0.3 and after["asr"] < without["asr"] - 0.3
    assert after["cca"] > before["cca"] - 0.04
    assert 0 <= ctx.figures["sau_shared_share"] <= 1


def test_i_bau_keeps_the_clean_accuracy_within_its_ball(digits_bn):
    before = digits_bn.ctx.evaluate(digits_bn.model)
    model, ctx = repaired(digits_bn, "i_bau")
    norms = ctx.figures["i_bau_perturbation_l2"]
    assert len(norms) == 5 and all(0 < n <= 10 * (1 + 1e-5) for n in norms)
    assert ctx.evaluate(model)["cca"] > before["cca"] - 0.03


@pytest.mark.parametrize(
    "name, kwargs",
    [
        ("i_bau", {"perturbed_share": 0.5, "n_rounds": 2}),
        ("sau", {"n_rounds": 2, "init": "random"}),
    ],
)
def test_same_seed_same_weights(digits_bn, name, kwargs):
    first, _ = repaired(digits_bn, name, **kwargs)
    second, _ = repaired(digits_bn, name, **kwargs)
    changed = False
    for (key, a), b in zip(first.state_dict().items(), second.state_dict().values(), strict=True):
        assert torch.equal(a, b), key
        changed |= not torch.equal(a, digits_bn.model.state_dict()[key])
    assert changed


def test_the_holdout_images_are_floats_in_pixel_space(digits_bn):
    x = to_float(digits_bn.data.holdout.x)
    assert x.min() >= 0 and x.max() <= 1  # the bounds above are in these units
