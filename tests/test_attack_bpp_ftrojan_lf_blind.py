"""BppAttack, FTrojan, the low-frequency attack and the blind backdoor: their triggers, the
optimisation and balancing pieces, and the user errors of their settings (the contract over
every attack: test_contracts.py)."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch
from torch import nn

from bdrun.attacks.blind import Blind, BlindLossHook, mgda_scales, min_norm_weight
from bdrun.attacks.bpp import NegativeSamplesHook, floyd_steinberg, squeeze
from bdrun.attacks.ftrojan import (
    FTrojan,
    block_dct,
    block_idct,
    dct_matrix,
    rgb_to_ycrcb,
    ycrcb_to_rgb,
)
from bdrun.attacks.lf import gaussian_low_pass, targeted_deepfool
from bdrun.config import component
from bdrun.data.base import DataInfo, ImageSet, to_float
from bdrun.errors import BdrunError
from bdrun.runner import prepare
from bdrun.training import train_settings

from conftest import compose_config, poison_only

FAST = (
    "dataset=fake",
    "train.epochs=1",
    "dataset.source.shape=[3,16,16]",
    "dataset.source.n_train=600",
)


def built(name: str, shape: tuple[int, int, int], seed: int = 0, **changes):
    """Attack `name` from its YAML (with `changes`), set up for images of `shape`."""
    attack = component("attack", name, **changes)
    attack.setup(DataInfo("test", shape, 10), seed)
    return attack


# -- BppAttack ---------------------------------------------------------------------------------


def floyd_steinberg_per_pixel(image: np.ndarray, levels: int) -> np.ndarray:
    """The textbook raster-order loop over one [C, H, W] image, as a reference."""
    work, (_, height, width) = image.astype(np.float64).copy(), image.shape
    out = np.zeros_like(work)
    for r in range(height):
        for c in range(width):
            old = work[:, r, c].copy()
            new = np.clip(np.round(old * (levels - 1)), 0, levels - 1) / (levels - 1)
            out[:, r, c], error = new, old - new
            for dr, dc, share in ((0, 1, 7 / 16), (1, -1, 3 / 16), (1, 0, 5 / 16), (1, 1, 1 / 16)):
                if r + dr < height and 0 <= c + dc < width:
                    work[:, r + dr, c + dc] += error * share
    return out


def test_batched_dithering_matches_the_per_pixel_loop():
    x = torch.rand(3, 2, 9, 7, generator=torch.Generator().manual_seed(0))
    batched = floyd_steinberg(x, 4).numpy()
    reference = np.stack([floyd_steinberg_per_pixel(image, 4) for image in x.numpy()])
    np.testing.assert_allclose(batched, reference, atol=1e-5)


@pytest.mark.parametrize("dithering", [False, True])
def test_bpp_leaves_at_most_squeeze_num_levels_per_channel(dithering):
    attack = built("bpp", (3, 16, 16), squeeze_num=5, dithering=dithering)
    out = attack.apply_trigger(torch.rand(8, 3, 16, 16, generator=torch.Generator().manual_seed(1)))
    grid = torch.arange(5) / 4
    for channel in range(3):
        values = out[:, channel].unique()
        assert len(values) <= 5
        assert torch.all((values[:, None] - grid[None]).abs().min(1).values < 1e-6)


def test_dithering_keeps_the_mean_colour_that_plain_squeezing_loses():
    flat = torch.full((2, 3, 32, 32), 0.3)  # between the two levels of squeeze_num 2
    assert squeeze(flat, 2).mean() == 0  # rounds every pixel down
    dithered = floyd_steinberg(flat, 2)
    assert torch.allclose(dithered.mean((2, 3)), torch.full((2, 3), 0.3), atol=0.02)
    gradient = torch.linspace(0, 1, 32).expand(1, 3, 32, 32)
    assert (floyd_steinberg(gradient, 3).mean() - gradient.mean()).abs() < 0.01


def test_bpp_negative_samples_get_another_images_residual_and_keep_their_labels():
    attack = built("bpp", (1, 8, 8), neg_rate=0.5)
    g = torch.Generator().manual_seed(2)
    x = (torch.rand(20, 1, 8, 8, generator=g) * 255).round().to(torch.uint8)
    poison = torch.zeros(20, dtype=torch.bool)
    poison[:4] = True  # backdoor rows are never negative samples
    data = ImageSet(x, torch.arange(20) % 10, poison=poison)
    trainee = SimpleNamespace(data=data)
    hook = NegativeSamplesHook(attack)
    hook.on_train_start(trainee)
    pos = torch.arange(12)  # 4 backdoor and 8 clean rows
    batch, y = to_float(x[pos]), data.y[pos]
    out, out_y = hook.on_batch(batch, y, pos, trainee)
    assert torch.equal(out_y, y)
    changed = (out != batch).flatten(1).any(1)
    assert int(changed.sum()) == 6 and not changed[:4].any()
    clean = to_float(x[4:])
    residuals = to_float(attack.triggered(x[4:])) - clean  # one per donor (clean rows)
    for row in changed.nonzero().flatten().tolist():
        candidates = (batch[row] + residuals).clamp(0, 1)
        assert (candidates - out[row]).abs().flatten(1).max(1).values.min() < 1e-6


# -- FTrojan ----------------------------------------------------------------------------------


def changed_coefficients(attack: FTrojan, x: torch.Tensor, window: int, yuv: bool) -> torch.Tensor:
    """DCT coefficients (per block, per channel) of the triggered images minus the clean ones."""
    before, after = x, attack.apply_trigger(x)
    if yuv:
        before, after = rgb_to_ycrcb(before), rgb_to_ycrcb(after)
    return block_dct(after, window) - block_dct(before, window)


def test_the_block_dct_is_orthonormal_and_inverted():
    d = dct_matrix(8)
    assert torch.allclose(d @ d.T, torch.eye(8), atol=1e-6)
    x = torch.rand(2, 3, 16, 16)
    assert torch.allclose(block_idct(block_dct(x, 8), 8), x, atol=1e-6)
    assert torch.allclose(ycrcb_to_rgb(rgb_to_ycrcb(x)), x, atol=1e-6)


@pytest.mark.parametrize("window, scaled", [("auto", (15, 31)), (16, (7, 15))])
def test_ftrojan_changes_only_the_chosen_chroma_coefficients(window, scaled):
    attack = built("ftrojan", (3, 32, 32), window=window)
    x = 0.4 + 0.2 * torch.rand(4, 3, 32, 32)  # no clamping near mid-grey
    size = 32 if window == "auto" else window
    delta = changed_coefficients(attack, x, size, yuv=True)
    expected = torch.zeros_like(delta)
    for p in scaled:
        expected[:, 1:, p::size, p::size] = 30 / 255
    assert torch.allclose(delta, expected, atol=1e-5)


def test_ftrojan_on_grey_28x28_uses_the_one_channel_and_one_scaled_block():
    attack = built("ftrojan", (1, 28, 28))
    assert attack.window_size == 28
    x = 0.4 + 0.2 * torch.rand(4, 1, 28, 28)
    delta = changed_coefficients(attack, x, 28, yuv=False)
    expected = torch.zeros_like(delta)
    expected[:, 0, 13, 13] = expected[:, 0, 27, 27] = 30 / 255
    assert torch.allclose(delta, expected, atol=1e-5)


# -- low frequency ------------------------------------------------------------------------------


def test_the_low_pass_filter_removes_high_frequencies_and_keeps_a_constant():
    checkerboard = ((torch.arange(32)[:, None] + torch.arange(32)[None]) % 2).float()[None]
    # the checkerboard is 0.5 plus the highest frequency; the filter keeps the 0.5 (with the
    # fall-off its zero padding gives a constant) and removes the rest
    constant = gaussian_low_pass(torch.ones(1, 32, 32), 6)
    assert torch.allclose(constant[0, 16, 16], torch.tensor(1.0), atol=1e-3)
    smooth = gaussian_low_pass(checkerboard, 6)
    assert (smooth - 0.5 * constant).abs().max() < 1e-3


def test_targeted_deepfool_reaches_the_target_of_a_linear_model():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(12, 4))
    x = torch.rand(3, 2, 2)
    start = int(model(x[None]).argmax())
    target = (start + 1) % 4
    step, used = targeted_deepfool(model, x, target, overshoot=0.02, max_steps=50)
    assert 1 <= used < 50
    assert int(model((x + step)[None]).argmax()) == target


def high_frequency_share(v: torch.Tensor) -> float:
    """Share of v's (mean-removed) spectral energy at frequencies above a quarter of the band."""
    spectrum = torch.fft.fftshift(torch.fft.fft2(v - v.mean((1, 2), keepdim=True)).abs() ** 2)
    size = v.shape[-1]
    k = torch.arange(size) - size // 2
    high = (k[:, None].abs() > size // 4) | (k[None].abs() > size // 4)
    return float(spectrum[:, high].sum() / spectrum.sum())


def test_lf_trigger_is_smooth_bounded_and_fixed_by_the_seed(tmp_path):
    # a small surrogate (200 images, one epoch) and a short search
    quick = (*FAST, "dataset.source.n_train=200", "attack=lf", "attack.passes=1")
    quick = (*quick, "attack.samples=20", "attack.deepfool_steps=20")
    run = poison_only(tmp_path / "a", *quick)
    trigger = run.attack._trigger
    assert trigger.shape == (3, 16, 16)
    assert trigger.min() >= 0 and trigger.max() <= 0.2 + 1e-6
    assert high_frequency_share(trigger) < 0.02
    assert high_frequency_share(torch.rand(3, 16, 16)) > 0.5  # what the measure says of noise
    again = poison_only(tmp_path / "b", *quick)
    assert torch.equal(again.attack._trigger, trigger)


# -- blind --------------------------------------------------------------------------------------


def test_mgda_weights_solve_the_two_task_min_norm_problem():
    # |g x1 + (1 - g) x2|^2 = 4 g^2 + (1 - g)^2 for x1 = (2, 0), x2 = (0, 1): minimum at g = 1/5
    x1, x2 = [torch.tensor([2.0, 0.0])], [torch.tensor([0.0, 1.0])]
    loss = torch.tensor(1.0)
    backdoor, normal = mgda_scales(x1, x2, loss, loss, "none")
    assert torch.isclose(backdoor, torch.tensor(0.2), atol=1e-4) and backdoor + normal == 1
    g = torch.Generator().manual_seed(3)
    for _ in range(20):
        a, b = torch.randn(6, generator=g), torch.randn(6, generator=g)
        gamma = min_norm_weight(a @ a, a @ b, b @ b)
        grid = torch.linspace(0.001, 0.999, 9981)
        norms = (grid[:, None] * a + (1 - grid[:, None]) * b).pow(2).sum(1)
        best = grid[norms.argmin()]
        assert abs(float(gamma) - float(best)) < 2e-4


def test_mgda_weights_take_the_clipped_ends_where_one_gradient_dominates():
    a, b = torch.tensor([1.0, 0.0]), torch.tensor([3.0, 0.0])  # <a, b> >= <a, a>: all on a
    assert float(min_norm_weight(a @ a, a @ b, b @ b)) == pytest.approx(0.999)
    assert float(min_norm_weight(b @ b, a @ b, a @ a)) == pytest.approx(0.001)


def test_blind_poisons_no_rows_and_triggers_the_backdoor_test_set(tmp_path):
    run = poison_only(tmp_path, *FAST, "attack=blind")
    assert not run.poisoned.poison.any()
    assert torch.equal(run.poisoned.x, run.clean_train.x)
    assert torch.equal(run.poisoned.y, run.clean_train.y)
    backdoor = run.backdoor_test
    assert torch.all(backdoor.y == 0) and not torch.any(backdoor.orig_y == 0)
    corner = to_float(backdoor.x)[:, :, 2:7, 11:14]  # top right, margin 2, on 16 x 16
    assert torch.all(corner[:, :, 0, 0] == 1) and torch.all(corner[:, :, 0, 1] == 0)


def test_blind_loss_combines_the_two_losses_with_its_weights():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(3 * 8 * 8, 10))
    x, y = torch.rand(6, 3, 8, 8), torch.arange(6) % 10
    trainee = SimpleNamespace(model=model, settings=train_settings())
    ce = nn.functional.cross_entropy
    for balance in ("fixed", "mgda"):
        attack: Blind = built("blind", (3, 8, 8), balance=balance, backdoor_share=0.5)
        hook = BlindLossHook(attack)
        hook.on_batch(x, y, torch.arange(6), trainee)
        loss = hook.loss(model(x), y, torch.arange(6), trainee)
        x_back, y_back = attack.backdoor_batch(x, y)
        assert torch.equal(y_back[:3], torch.zeros(3, dtype=torch.long))
        assert torch.equal(y_back[3:], y[3:]) and torch.equal(x_back[3:], x[3:])
        normal, backdoor = ce(model(x), y), ce(model(x_back), y_back)
        if balance == "fixed":
            expected = 1.0 * normal + 0.9 * backdoor
        else:
            params = list(model.parameters())
            b_scale, n_scale = mgda_scales(
                list(torch.autograd.grad(backdoor, params, retain_graph=True)),
                list(torch.autograd.grad(normal, params, retain_graph=True)),
                backdoor,
                normal,
                "loss+",
            )
            assert 0 < float(b_scale) < 1
            expected = n_scale * normal + b_scale * backdoor
        assert torch.allclose(loss, expected, atol=1e-6)


def test_blind_training_plants_the_backdoor(tmp_path):
    """Digits, smoke slice, a few epochs: the blind loss against the same hook with a zero
    backdoor weight (plain training) on the same trigger."""
    common = ("attack=blind", "debug=smoke", "logger=none", "train.epochs=4")
    asr = {}
    for label, balance in (
        ("blind", ()),
        ("off", ("attack.balance=fixed", "attack.fixed_scales.backdoor=0")),
    ):
        run = prepare(compose_config(*common, *balance), tmp_path / label)
        asr[label] = run.ctx.scorer_or_fail().evaluate(run.model)["asr"]
    assert asr["blind"] > 0.8 and asr["off"] < 0.4


# -- settings -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "attack, override, message",
    [
        ("bpp", "attack.squeeze_num=1", "attack.squeeze_num=1 must be in 2..255"),
        ("bpp", "attack.squeeze_num=2.5", "attack.squeeze_num=2.5 must be an integer"),
        ("bpp", "attack.dithering=maybe", "attack.dithering='maybe' must be true or false"),
        ("bpp", "attack.neg_rate=1.5", "attack.neg_rate=1.5 must be a fraction"),
        ("ftrojan", "attack.magnitude=0", "attack.magnitude=0 adds no trigger"),
        ("ftrojan", "attack.window=5", "attack.window=5 does not divide the 16x16"),
        ("ftrojan", "attack.positions=[[15,32]]", "attack.positions=.* pairs in 0..31"),
        ("ftrojan", "attack.positions=[]", "attack.positions=.* non-empty"),
        ("ftrojan", "attack.channels=[3]", "attack.channels=.* in 0..2"),
        ("ftrojan", "attack.yuv=1", "attack.yuv=1 must be true or false"),
        ("lf", "attack.samples=0", "attack.samples=0 must be >= 1"),
        ("lf", "attack.fooling_rate=2", "attack.fooling_rate=2 must be a fraction"),
        ("lf", "attack.sigma=0", "attack.sigma=0.0 must be > 0"),
        ("lf", "attack.amplitude=1.5", "attack.amplitude=1.5 must be in .0, 1."),
        ("lf", "attack.passes=x", "attack.passes='x' must be an integer"),
        ("blind", "attack.balance=sum", "attack.balance='sum' must be one of mgda, fixed"),
        ("blind", "attack.mgda_normalize=l1", "attack.mgda_normalize='l1' must be one of"),
        ("blind", "attack.fixed_scales.backdoor=-1", "attack.fixed_scales=.* >= 0"),
        ("blind", "attack.backdoor_share=0", "attack.backdoor_share=0 trains no backdoor"),
        ("blind", "attack.location=[14,14]", "does not fit 16x16"),
    ],
)
def test_bad_settings_are_one_line_user_errors(attack, override, message, tmp_path):
    with pytest.raises(BdrunError, match=message) as caught:
        poison_only(tmp_path, *FAST, f"attack={attack}", override)
    assert "\n" not in str(caught.value)
