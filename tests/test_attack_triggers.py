"""Trigger functions of the attack suite, checked against hand-computed values (no training)."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from bdrun.attacks.clean_label import corner_trigger, pgd
from bdrun.attacks.generators import TriggerNet
from bdrun.attacks.input_aware import diversity_loss, other_rows
from bdrun.attacks.multi_trigger import split_count
from bdrun.attacks.pruning_aware import channel_stats, mask_channels
from bdrun.attacks.triggers import blend, identity_grid, ramp, sinusoid, warp
from bdrun.attacks.wanet import warping_field
from bdrun.config import component
from bdrun.data.base import DataInfo
from bdrun.errors import BdrunError


def test_blend_mixes_image_and_key_with_alpha():
    x = torch.full((2, 1, 2, 2), 0.5)
    key = torch.tensor([[[0.0, 1.0], [1.0, 0.0]]])
    out = blend(x, key, 0.2)
    assert torch.allclose(out[0, 0], torch.tensor([[0.4, 0.6], [0.6, 0.4]]))
    assert torch.all(x == 0.5)  # pure


def test_sinusoid_follows_barni_formula_along_columns():
    wave = sinusoid((3, 4, 12), delta=40 / 255, frequency=6)
    assert wave.shape == (3, 4, 12)
    for j in range(12):
        expected = 40 / 255 * math.sin(2 * math.pi * j * 6 / 12)
        assert torch.allclose(wave[:, :, j], torch.full((3, 4), expected), atol=1e-6)
    assert torch.equal(wave[0], wave[2])  # same on every channel and row


def test_ramp_rises_by_delta_over_width_per_column_from_zero():
    wave = ramp((2, 3, 4), delta=0.4)
    assert wave.shape == (2, 3, 4)
    # Barni et al.'s code: delta * j / m for columns j = 0..m-1 (m = 4): 0, 0.1, 0.2, 0.3
    expected = torch.tensor([0.0, 0.1, 0.2, 0.3]).expand(2, 3, 4)
    assert torch.allclose(wave, expected, atol=1e-7)


def test_identity_grid_warp_returns_the_image_and_a_shift_moves_it():
    x = torch.rand(3, 2, 5, 7)
    grid = identity_grid(5, 7)
    assert grid.shape == (1, 5, 7, 2)
    assert torch.allclose(warp(x, grid), x, atol=1e-6)
    shifted = grid.clone()
    shifted[..., 0] += 2 / 6  # one pixel to the right in grid units (7 columns span 2)
    assert torch.allclose(warp(x, shifted)[..., :-1], x[..., 1:], atol=1e-5)


def test_wanet_field_has_unit_mean_control_points_and_image_size():
    field = warping_field(4, 28, 20, torch.Generator().manual_seed(0))
    assert field.shape == (1, 28, 20, 2)
    # bicubic upsampling with aligned corners keeps the control values at the corners
    control = torch.rand(1, 2, 4, 4, generator=torch.Generator().manual_seed(0)) * 2 - 1
    control = control / control.abs().mean()
    assert torch.allclose(field[0, 0, 0], control[0, :, 0, 0], atol=1e-5)
    assert torch.allclose(field[0, -1, -1], control[0, :, -1, -1], atol=1e-5)


def test_label_consistent_trigger_matches_the_authors_corner_pattern():
    signs = corner_trigger("bottom_right", 6, 6)[0]
    white = (signs == 1).int()
    assert white[-3:, -3:].tolist() == [[0, 0, 1], [0, 1, 0], [1, 0, 1]]
    assert (signs[:3] == 0).all() and (signs[:, :3] == 0).all()
    corners = corner_trigger("all_corners", 6, 6)[0]
    assert (corners[:3, :3] == 1).int().tolist() == [[1, 0, 0], [0, 1, 0], [1, 0, 1]]
    assert (corners != 0).sum() == 36  # four full 3x3 corners on a 6x6 image


class Linear2(nn.Module):
    """A linear classifier on 2x2 grey images, for PGD checks."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 2)
        with torch.no_grad():
            self.fc.weight.copy_(torch.tensor([[1.0, 0, 0, 0], [0, 0, 0, 1.0]]))
            self.fc.bias.zero_()

    def forward(self, x):
        return self.fc(x.flatten(1))


@pytest.mark.parametrize("norm", ["linf", "l2"])
def test_pgd_stays_in_the_ball_and_raises_the_loss(norm):
    model = Linear2()
    x = torch.full((4, 1, 2, 2), 0.5)
    y = torch.zeros(4, dtype=torch.long)
    adv = pgd(model, x, y, eps=0.1, steps=10, step_size=0.025, norm=norm)
    delta = (adv - x).flatten(1)
    size = delta.abs().amax(1) if norm == "linf" else delta.norm(dim=1)
    assert torch.all(size <= 0.1 + 1e-6) and torch.all(size > 0.09)
    loss = nn.functional.cross_entropy
    assert loss(model(adv), y) > loss(model(x), y)
    if norm == "linf":  # the loss grows along -pixel 0 and +pixel 3: the corners of the box
        assert torch.allclose(delta[0], torch.tensor([-0.1, 0.0, 0.0, 0.1]))


def test_trigger_net_outputs_in_unit_range_for_any_size():
    for shape in [(1, 28, 28), (3, 15, 13), (1, 8, 8)]:
        net = TriggerNet(shape).eval()
        out = net(torch.rand(2, *shape))
        assert out.shape == (2, *shape) and out.min() > 0 and out.max() < 1
        mask = TriggerNet(shape, out_channels=1).eval()(torch.rand(2, *shape))
        assert mask.shape == (2, 1, *shape[1:])
    step = TriggerNet.threshold(torch.tensor([0.0, 0.5, 1.0]))
    assert step[0] < 1e-7 and abs(step[1] - 0.5) < 1e-6 and step[2] > 1 - 1e-7


def test_diversity_loss_is_input_distance_over_output_distance():
    x1, x2 = torch.zeros(1, 1, 2, 2), torch.ones(1, 1, 2, 2)
    out1, out2 = torch.zeros(1, 1, 2, 2), torch.full((1, 1, 2, 2), 0.5)
    assert diversity_loss(x1, x2, out1, out2).item() == pytest.approx(2.0, rel=1e-5)


def test_other_rows_never_pairs_a_row_with_itself():
    rows = torch.arange(50)
    partners = other_rows(rows, 50, torch.Generator().manual_seed(1))
    assert torch.all(partners != rows) and partners.min() >= 0 and partners.max() < 50


def test_split_count_spreads_the_remainder():
    assert split_count(10, 3) == [4, 3, 3]
    assert sum(split_count(5701, 3)) == 5701


def test_channel_stats_and_masking_on_a_hand_made_conv():
    conv = nn.Conv2d(1, 2, 1)
    with torch.no_grad():
        conv.weight.copy_(torch.tensor([1.0, -1.0]).view(2, 1, 1, 1))
        conv.bias.copy_(torch.tensor([0.0, 1.0]))
    model = nn.Sequential(conv, nn.ReLU())
    x = torch.tensor([0.0, 0.5, 1.0, 0.5]).view(1, 1, 2, 2).repeat(3, 1, 1, 1)
    mean, peak = channel_stats(model, "1", x, batch_size=2, device=torch.device("cpu"))
    assert torch.allclose(mean, torch.tensor([0.5, 0.5])) and torch.allclose(peak, torch.ones(2))
    handle = mask_channels(model, "0", torch.tensor([True, False]))
    out = model(x)
    handle.remove()
    assert torch.all(out[:, 1] == 0) and torch.allclose(out[:, 0], x[:, 0])


def test_sig_ramp_signal_is_added_in_pixel_units_and_a_bad_signal_is_refused():
    attack = component("attack", "sig", signal="ramp", delta=51, test_delta=102, target=0)
    attack.setup(DataInfo("toy", (1, 2, 5), 10), seed=0)
    zeros = torch.zeros(3, 1, 2, 5)
    # 51 / 255 = 0.2 in training, 0.4 at test time, times j / 5 for columns j = 0..4
    train_row = torch.tensor([0.0, 0.04, 0.08, 0.12, 0.16])
    assert torch.allclose(attack.poison_images(zeros, torch.zeros(3))[0, 0, 1], train_row)
    assert torch.allclose(attack.apply_trigger(zeros)[2, 0, 0], 2 * train_row)
    assert torch.allclose(attack.apply_trigger(torch.ones(1, 1, 2, 5)), torch.ones(1, 1, 2, 5))
    with pytest.raises(BdrunError, match="attack.signal='saw' must be one of sine, ramp"):
        component("attack", "sig", signal="saw")
