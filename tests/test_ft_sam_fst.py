"""FT-SAM and FST: the SAM step, the smoothed loss, the head, its re-initialisation and norm
projection by hand; determinism; bad values; digits runs."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from bdrun.config import component
from bdrun.data.fake import FakeImages
from bdrun.defenses.fst import (
    FeatureShift,
    classification_head,
    project_to_norm,
    reinitialise,
)
from bdrun.defenses.ft_sam import SharpnessAware, sam_perturbation, smooth_cross_entropy
from bdrun.errors import BdrunError
from bdrun.models.small_cnn import SmallCNN
from bdrun.runner import run
from bdrun.training import fit, hardware_settings, train_settings

from conftest import compose_config, repair_figures


def trainee(model: nn.Module, label_smoothing: float = 0.0) -> SimpleNamespace:
    return SimpleNamespace(
        model=model,
        device=torch.device("cpu"),
        settings=SimpleNamespace(label_smoothing=label_smoothing),
    )


def test_smooth_cross_entropy_puts_the_smoothing_on_the_other_classes():
    logits = torch.tensor([[2.0, 0.0, -1.0]])
    log_p = F.log_softmax(logits, 1)[0]
    # 0.9 on the label (class 1), 0.1 / 2 on each of the two others
    expected = -(0.05 * log_p[0] + 0.9 * log_p[1] + 0.05 * log_p[2])
    torch.testing.assert_close(smooth_cross_entropy(logits, torch.tensor([1]), 0.1), expected)
    torch.testing.assert_close(
        smooth_cross_entropy(logits, torch.tensor([0]), 0.0),
        F.cross_entropy(logits, torch.tensor([0])),
    )


def test_sam_perturbation_by_hand():
    a, b = torch.tensor([1.0], requires_grad=True), torch.tensor([2.0], requires_grad=True)
    a.grad, b.grad = torch.tensor([3.0]), torch.tensor([4.0])
    # plain SAM: rho * g / ||g||, the norm over both parameters (5)
    e_a, e_b = sam_perturbation([a, b], rho=0.5, adaptive=False)
    torch.testing.assert_close((e_a, e_b), (torch.tensor([0.3]), torch.tensor([0.4])))
    # ASAM: ||(|w| g)|| = ||(3, 8)|| = sqrt(73); e = rho * w^2 g / sqrt(73)
    e_a, e_b = sam_perturbation([a, b], rho=0.5, adaptive=True)
    norm = 73**0.5
    torch.testing.assert_close(
        (e_a, e_b), (torch.tensor([0.5 * 3 / norm]), torch.tensor([0.5 * 16 / norm]))
    )


def test_the_sam_step_takes_the_gradient_at_the_perturbed_weights():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.ReLU(), nn.Linear(4, 3)).train()
    x, y = torch.randn(8, 3), torch.tensor([0, 1, 2, 0, 1, 2, 0, 1])
    hook = SharpnessAware(rho=2.0, adaptive=True, smoothing=0.1)
    module = trainee(model)
    x, y = hook.on_batch(x, y, torch.arange(8), module)
    hook.loss(model(x), y, torch.arange(8), module).backward()
    names = [name for name, _ in model.named_parameters()]
    params = list(model.parameters())
    weights = [p.detach().clone() for p in params]
    stats = [b.clone() for b in model.buffers()]
    ascent = sam_perturbation(params, 2.0, adaptive=True)
    perturbed = {
        n: (w + e).requires_grad_() for n, w, e in zip(names, weights, ascent, strict=True)
    }
    buffers = {n: b.clone() for n, b in model.named_buffers()}
    loss = smooth_cross_entropy(functional_call(model, {**perturbed, **buffers}, (x,)), y, 0.1)
    expected = torch.autograd.grad(loss, list(perturbed.values()))

    hook.on_after_backward(module)
    for p, w, g in zip(params, weights, expected, strict=True):
        assert torch.equal(p, w)  # the weights of before, bit for bit
        torch.testing.assert_close(p.grad, g)
    # the second pass left BatchNorm's running statistics as the first one did
    for before, after in zip(stats, model.buffers(), strict=True):
        assert torch.equal(before, after)
    assert model[1].momentum == 0.1  # restored


def test_the_head_is_the_last_linear_layer():
    assert classification_head(SmallCNN((1, 8, 8), 10), 10)[0] == "classifier"
    no_head = nn.Sequential(nn.Conv2d(1, 10, 8), nn.Flatten())
    with pytest.raises(BdrunError, match="has no nn.Linear classification head"):
        classification_head(no_head, 10)
    with pytest.raises(BdrunError, match=r"\(1\) has 4 outputs, not one per class \(10\)"):
        classification_head(nn.Sequential(nn.Linear(3, 10), nn.Linear(10, 4)), 10)


def test_the_head_is_reinitialised_from_the_generator_and_projected_to_a_norm():
    head = nn.Linear(16, 3)
    reinitialise(head, torch.Generator().manual_seed(5))
    first = head.weight.detach().clone(), head.bias.detach().clone()
    assert head.weight.abs().max() <= 0.25 and head.bias.abs().max() <= 0.25  # 1 / sqrt(16)
    reinitialise(head, torch.Generator().manual_seed(5))
    assert torch.equal(head.weight, first[0]) and torch.equal(head.bias, first[1])
    project_to_norm(head.weight, torch.tensor(3.0))
    torch.testing.assert_close(head.weight.norm(), torch.tensor(3.0))
    torch.testing.assert_close(head.weight / head.weight.norm(), first[0] / first[0].norm())


def test_the_feature_shift_loss_by_hand():
    model = nn.Sequential(nn.Linear(2, 2))
    with torch.no_grad():
        model[0].weight.copy_(torch.tensor([[1.0, 2.0], [0.0, -1.0]]))
    original = torch.tensor([[0.5, 0.0], [1.0, 2.0]])  # <W, W0> = 0.5 - 2 = -1.5
    hook = FeatureShift("0", original, alpha=0.2)
    module = trainee(model)
    hook.on_train_start(module)
    logits, y = torch.tensor([[1.0, 0.0]]), torch.tensor([1])
    expected = F.cross_entropy(logits, y) + 0.2 * -1.5
    torch.testing.assert_close(hook.loss(logits, y, y, module), expected)
    hook.on_after_step(module)
    torch.testing.assert_close(model[0].weight.norm(), original.norm())


def hook_for(name: str, model: SmallCNN):
    if name == "ft_sam":
        return SharpnessAware(rho=2.0, adaptive=True, smoothing=0.1)
    return FeatureShift("classifier", model.classifier.weight.detach() * 2, alpha=0.2)


@pytest.mark.parametrize("name", ["ft_sam", "fst"])
def test_a_training_with_the_hook_is_deterministic(name):
    data = FakeImages(shape=(1, 8, 8), num_classes=4, n_train=64, n_test=8).load().train
    settings = train_settings(epochs=2, batch_size=16, lr=0.01)
    trained = []
    for _ in range(2):
        torch.manual_seed(0)
        model = SmallCNN((1, 8, 8), 4, width=8, hidden=16, batch_norm=True)
        target_norm = 2 * model.classifier.weight.norm()
        fit(model, data, settings, hardware_settings(), seed=0, hooks=[hook_for(name, model)])
        trained.append(model.state_dict())
        if name == "fst":  # projected after every step: the head keeps W0's norm
            torch.testing.assert_close(model.classifier.weight.norm(), target_norm.detach())
    for key, value in trained[0].items():
        assert torch.equal(value, trained[1][key]), key


@pytest.mark.parametrize(
    ("name", "kwargs", "message"),
    [
        ("ft_sam", {"rho": 0}, "defense.rho=0 must be > 0"),
        ("ft_sam", {"rho": -1.0}, "defense.rho=-1.0 must be > 0"),
        ("ft_sam", {"lr": -0.1}, r"defense.lr=-0.1 must be > 0"),
        ("ft_sam", {"epochs": 0}, "defense.epochs=0 must be >= 1"),
        ("ft_sam", {"label_smoothing": 1.0}, r"label_smoothing=1.0 must be in \[0, 1\)"),
        ("ft_sam", {"adaptive": "yes"}, "defense.adaptive='yes' must be true or false"),
        ("ft_sam", {"batch_size": 0}, "defense.batch_size must be >= 1"),
        ("fst", {"alpha": -0.1}, "defense.alpha=-0.1 must be >= 0"),
        ("fst", {"lr": 0}, "defense.lr=0.0 must be > 0"),
        ("fst", {"epochs": 0}, "defense.epochs=0 must be >= 1"),
        ("fst", {"momentum": -1}, "defense.momentum and defense.weight_decay >= 0"),
    ],
)
def test_bad_settings_are_one_line_user_errors(name, kwargs, message):
    with pytest.raises(BdrunError, match=message):
        component("defense", name, **kwargs)


def test_a_small_holdout_a_headless_model_and_half_precision_are_user_errors():
    info = SimpleNamespace(num_classes=10)
    small = SimpleNamespace(holdout=[0] * 9, info=info)
    for name in ("ft_sam", "fst"):
        with pytest.raises(BdrunError, match="at least 10 clean holdout images but .* has 9"):
            component("defense", name).repair(SmallCNN((1, 8, 8), 10), small, None)
    enough = SimpleNamespace(holdout=[0] * 10, info=info)
    no_head = nn.Sequential(nn.Conv2d(1, 10, 8), nn.Flatten())
    with pytest.raises(BdrunError, match="Sequential has no nn.Linear classification head"):
        component("defense", "fst").repair(no_head, enough, None)
    half = SimpleNamespace(hardware=SimpleNamespace(precision="16-mixed"))
    with pytest.raises(BdrunError, match="trainer.precision=16-mixed scales; use 32-true"):
        component("defense", "ft_sam").repair(SmallCNN((1, 8, 8), 10), enough, half)


def test_fst_removes_the_digits_backdoor_and_keeps_most_clean_accuracy(tmp_path):
    # measured (docs/defenses/ft_sam_fst.md): ASR 100 % -> 26 %, CCA 98.7 % -> 90.2 %
    cfg = compose_config("model=small_cnn_bn", "defense=fst", "logger=none")
    d, before, after = repair_figures(run(cfg, tmp_path))
    assert before["asr"] > 0.9
    assert after["asr"] < 0.5
    assert before["cca"] - after["cca"] < 0.15
    assert d["fst_head"] == "classifier" and -1 <= d["fst_head_cosine"] < 0.5


def test_ft_sam_on_digits_keeps_clean_accuracy(tmp_path):
    # a shortened FT-SAM (the defaults' 100 epochs of one batch barely move the digits
    # backdoor: docs/defenses/ft_sam_fst.md); what can fail here is the clean accuracy
    cfg = compose_config("model=small_cnn_bn", "defense=ft_sam", "defense.epochs=5", "logger=none")
    metrics = run(cfg, tmp_path)["metrics"]
    before, after = metrics["before"], metrics["after"]
    assert after["cca"] >= before["cca"] - 0.02
    assert after != before


@pytest.mark.slow
def test_ft_sam_with_more_steps_weakens_the_digits_backdoor(tmp_path):
    # batch 32: 4 steps an epoch, 400 in all, nearer the authors' ~1,000 on 5 % of CIFAR-10
    # (measured: ASR 100 % -> 89 %, CCA 98.7 % -> 98.1 %)
    cfg = compose_config(
        "model=small_cnn_bn", "defense=ft_sam", "defense.batch_size=32", "logger=none"
    )
    metrics = run(cfg, tmp_path)["metrics"]  # a repair without figures of its own
    before, after = metrics["before"], metrics["after"]
    assert after["asr"] <= before["asr"] - 0.05
    assert after["cca"] >= before["cca"] - 0.02
