"""CLP: channel bounds by hand, what it prunes and what it leaves alone, on tiny models."""

from __future__ import annotations

import torch

from bdrun.config import component
from bdrun.defenses.clp import channel_bounds, conv_sites
from bdrun.models.small_cnn import SmallCNN


class Figures:
    """The one RunContext tool CLP uses: `record`."""

    def __init__(self) -> None:
        self.figures: dict = {}

    def record(self, **figures) -> None:
        self.figures.update(figures)


def repaired(model: torch.nn.Module) -> tuple[torch.nn.Module, dict]:
    ctx = Figures()
    out = component("defense", "clp").repair(model, None, ctx)
    return out, ctx.figures


def bn_model() -> SmallCNN:
    torch.manual_seed(0)
    return SmallCNN((1, 8, 8), 10, batch_norm=True, width=32, hidden=16, dropout=0.0).eval()


def test_a_bound_is_the_kernels_spectral_norm_times_gamma_over_the_bn_std():
    model = bn_model()
    with torch.no_grad():
        model.bn1.weight[3] = -2.0
        model.bn1.running_var[3] = 4.0
    site = conv_sites(model)[0]
    assert site.conv_name == "conv1" and site.bn is model.bn1
    kernel = model.conv1.weight[3].reshape(1, 9)
    expected = torch.linalg.svdvals(kernel.detach())[0] * 2.0 / 2.0
    assert torch.allclose(channel_bounds(site)[3], expected)


def test_clp_prunes_an_outsized_channel_and_leaves_a_normal_model_alone():
    model = bn_model()
    _, figures = repaired(model)
    assert figures["clp_pruned"] == {"conv1": 0, "conv2": 0}
    assert figures["clp_with_bn"] == {"conv1": True, "conv2": True}
    with torch.no_grad():
        model.bn2.weight[5] = 50.0
    out, figures = repaired(model)
    assert figures["clp_pruned"] == {"conv1": 0, "conv2": 1}
    assert out.bn2.weight[5] == 0 and out.bn2.bias[5] == 0
    assert torch.equal(out.bn2.weight[:5], model.bn2.weight[:5])
    assert model.bn2.weight[5] == 50.0  # the given model is left as it was


def test_a_conv_without_bn_is_bounded_and_pruned_by_its_kernel():
    torch.manual_seed(0)
    model = SmallCNN((1, 8, 8), 10, batch_norm=False, width=32, hidden=16, dropout=0.0)
    with torch.no_grad():
        model.conv2.weight[7] *= 50
    out, figures = repaired(model)
    assert figures["clp_pruned"] == {"conv1": 0, "conv2": 1}
    assert figures["clp_with_bn"] == {"conv1": False, "conv2": False}
    assert not out.conv2.weight[7].any() and out.conv2.bias[7] == 0
