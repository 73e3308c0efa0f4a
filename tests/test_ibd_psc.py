"""IBD-PSC: which layers it amplifies, what its score means, and one-line errors."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from bdrun.config import component
from bdrun.defenses.ibd_psc import IbdPscDetector, amplified, scaled_layers
from bdrun.errors import BdrunError
from bdrun.models.small_cnn import SmallCNN


def model(batch_norm: bool) -> nn.Module:
    torch.manual_seed(0)
    return SmallCNN((1, 8, 8), 4, width=4, hidden=8, batch_norm=batch_norm).eval()


def test_it_amplifies_the_deepest_batch_norm_layers_of_a_copy():
    net = model(batch_norm=True)
    bn1, bn2 = net.bn1, net.bn2
    assert scaled_layers(net) == [bn2, bn1]  # deepest first
    copy = amplified(net, 1, 1.5)
    assert torch.allclose(copy.bn2.weight, 1.5 * bn2.weight)
    assert torch.allclose(copy.bn2.bias, 1.5 * bn2.bias)
    assert torch.equal(copy.bn1.weight, bn1.weight)  # not that deep
    assert torch.equal(net.bn2.weight, bn2.weight) and net.bn2 is bn2  # the model is untouched


def test_without_batch_norm_the_conv_layers_are_amplified():
    net = model(batch_norm=False)
    assert scaled_layers(net) == [net.conv2, net.conv1]
    copy = amplified(net, 2, 2.0)
    assert torch.allclose(copy.conv1.weight, 2 * net.conv1.weight)
    assert torch.allclose(copy.conv2.bias, 2 * net.conv2.bias)


class Constant(nn.Module):
    """Predicts label 1 with probability ~1 whatever its BN scale: its logits ignore the BN."""

    def __init__(self) -> None:
        super().__init__()
        self.bn = nn.BatchNorm2d(1)
        self.register_buffer("logits", torch.tensor([0.0, 20.0, 0.0]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.logits.expand(len(x), 3) + 0 * self.bn(x).sum((1, 2, 3))[:, None]


def test_a_prediction_that_survives_amplification_scores_near_one_and_is_rejected():
    detector = IbdPscDetector(Constant(), [1, 1], 1.5, 0.9, 16, "cpu")
    x = torch.rand(5, 1, 4, 4)
    scores = detector.score(x)
    assert scores.shape == (5,) and bool((scores > 0.99).all())
    assert bool(detector.rejects(x).all())


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"n": 0}, r"^defense.n=0 must be >= 1"),
        ({"xi": 1.0}, r"^defense.xi=1.0 must be in \[0, 1\)"),
        ({"threshold": 2}, r"^defense.threshold=2.0 must be in \[0, 1\]"),
        ({"scale": 1}, r"^defense.scale=1.0 must be > 1"),
        ({"frr": 1.5}, r"^defense.frr=1.5 must be in \(0, 1\)"),
    ],
)
def test_bad_values_end_in_one_line(overrides, message):
    with pytest.raises(BdrunError, match=message):
        component("defense", "ibd_psc", **overrides)
