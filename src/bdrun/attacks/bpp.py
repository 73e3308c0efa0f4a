"""BppAttack (Wang et al. 2022): colour-depth squeezing with dithering as the trigger, plus
negative training samples that keep their labels."""

from __future__ import annotations

from collections.abc import Callable
from functools import lru_cache
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from bdrun.attacks.base import Attack
from bdrun.data.base import DataInfo, to_float
from bdrun.errors import BdrunError
from bdrun.metrics import accuracy
from bdrun.rng import generator
from bdrun.training import Trainee, TrainingHook
from bdrun.validate import coerce, flag, fraction

if TYPE_CHECKING:
    from bdrun.context import RunContext
    from bdrun.state import RunData


def residual(stored: Tensor, triggered: Tensor) -> Tensor:
    """What the trigger added to stored images (either dtype), as floats."""
    return to_float(triggered) - to_float(stored)


# Floyd-Steinberg error diffusion: (row offset, column offset, share of the error)
DIFFUSION = ((0, 1, 7 / 16), (1, -1, 3 / 16), (1, 0, 5 / 16), (1, 1, 1 / 16))
CHUNK = 8192  # images per pass when the hook squeezes the whole training set


def squeeze(x: Tensor, levels: int) -> Tensor:
    """Every value of x (in [0, 1]) rounded to the nearest of `levels` evenly spaced levels."""
    steps = levels - 1
    return torch.round(x * steps).div_(steps)


@lru_cache(maxsize=8)
def _wavefronts(
    height: int, width: int
) -> tuple[tuple[Tensor, tuple[tuple[Tensor, Tensor], ...]], ...]:
    """Pixels of an H x W image in Floyd-Steinberg order, as wavefronts: pixel (r, c) at step
    c + 2r. A pixel receives error only from pixels of earlier steps (its left neighbour and
    the three above it), so each step quantises its pixels at once. Per step: the flat indices
    of its pixels and, per diffusion direction, (source positions within the step, targets)."""
    rows = torch.arange(height).repeat_interleave(width)
    cols = torch.arange(width).repeat(height)
    order = cols + 2 * rows
    steps = []
    for step in range(int(order.max()) + 1):
        flat = (order == step).nonzero().flatten()
        r, c = flat // width, flat % width
        spread = []
        for dr, dc, _ in DIFFUSION:
            inside = (r + dr < height) & (c + dc >= 0) & (c + dc < width)
            spread.append((inside.nonzero().flatten(), ((r + dr) * width + c + dc)[inside]))
        steps.append((flat, tuple(spread)))
    return tuple(steps)


def floyd_steinberg(x: Tensor, levels: int) -> Tensor:
    """x [N, C, H, W] in [0, 1] squeezed to `levels` levels with Floyd-Steinberg dithering: each
    pixel is rounded in raster order (levels clamped to [0, 1]) and its rounding error spread
    to its unvisited neighbours, 7/16 right, 3/16 down-left, 5/16 down, 1/16 down-right, per
    channel. Batched over images and channels; the loop runs over the W + 2(H - 1) wavefronts
    of the raster order, not over pixels. The output holds at most `levels` values per channel."""
    n, c, height, width = x.shape
    work = x.reshape(n, c, height * width).to(torch.float32, copy=True)
    out = torch.empty_like(work)
    steps = levels - 1
    for flat, spread in _wavefronts(height, width):
        flat = flat.to(x.device)
        old = work[:, :, flat]
        new = torch.round(old * steps).clamp_(0, steps).div_(steps)
        out[:, :, flat] = new
        error = old - new
        for (sources, targets), (_, _, share) in zip(spread, DIFFUSION, strict=True):
            if len(targets):
                sources, targets = sources.to(x.device), targets.to(x.device)
                work.index_add_(2, targets, error[:, :, sources] * share)
    return out.reshape(x.shape).to(x.dtype)


class Bpp(Attack):
    """BppAttack: the trigger is the image itself at a lower colour depth, with dithering.

    Wang, Zhai and Ma, "BppAttack: Stealthy and Efficient Trojan Attacks against Deep Neural
    Networks via Image Quantization and Contrastive Adversarial Learning", CVPR 2022. The
    authors' code is RU-System-Software-and-Security/BppAttack (bppattack.py, config.py;
    the README of that repository credits WaNet's release, on which it is built).

    Trigger: every channel value rounded to the nearest of `squeeze_num` levels, with
    Floyd-Steinberg dithering (`floydDitherspeed` in bppattack.py) or without. Defaults:
    squeeze_num 8 (config.py and BackdoorBench's bpp config; the authors' README command uses
    32), poison rate 0.2 and neg_rate 0.2 (config.py `injection_rate`, `neg_rate`;
    BackdoorBench's default.yaml uses 0.1 and 0.1, its original_default.yaml 0.2 and 0.2).
    Dithering is on: the paper's trigger is quantisation with dithering, which config.py
    switches off by default (`--dithering`, default False, as in BackdoorBench); the YAML
    switches it (`attack.dithering=false`). Levels are clamped to [0, 1] while dithering
    (the authors' loop can leave that range).

    Negative samples (the authors' "neg" / "cross" inputs): in every batch,
    round(batch * neg_rate) clean samples get the residual of another training image
    (its triggered version minus itself) added, clamped, and keep their labels, so the network
    must learn the exact depth reduction of the input itself rather than the quantisation
    noise pattern. The residuals come from the clean training rows, squeezed once when the
    training starts (the authors keep a list of residuals of five passes over the augmented
    training set). As in WaNet here, the backdoor samples are fixed rows (exactly
    round(poison_rate * N), the ground-truth mask) where the authors draw a share of each batch.
    The paper's contrastive adversarial training is not in the authors' training script.

    Parameters:
        squeeze_num: colour levels per channel after squeezing (256 = the 8-bit original).
        dithering: Floyd-Steinberg dithering while squeezing (true) or plain rounding (false).
        neg_rate: share of each batch turned into negative samples (0 = none).
    """

    name = "bpp"

    def __init__(self, squeeze_num: int, dithering: bool, neg_rate: float, **base) -> None:
        super().__init__(**base)
        self.squeeze_num = squeeze_num
        self.dithering = dithering
        self.neg_rate = neg_rate

    def setup(self, info: DataInfo, seed: int) -> None:
        super().setup(info, seed)
        self.squeeze_num = coerce(self.squeeze_num, "int", "attack.squeeze_num")
        if not 2 <= self.squeeze_num <= 255:
            raise BdrunError(
                f"attack.squeeze_num={self.squeeze_num} must be in 2..255 colour levels, e.g. 8"
            )
        self.dithering = flag(self.dithering, "dithering", group="attack")
        self.neg_rate = fraction(self.neg_rate, "attack.neg_rate")
        self.seed = seed

    def apply_trigger(self, x: Tensor) -> Tensor:
        if self.dithering:
            return floyd_steinberg(x, self.squeeze_num)
        return squeeze(x, self.squeeze_num)

    def training_hooks(self) -> list[TrainingHook]:
        return [NegativeSamplesHook(self)] if self.neg_rate > 0 else []

    def evaluate(
        self, predict_fn: Callable[[Tensor], Tensor], data: RunData, ctx: RunContext
    ) -> dict[str, float]:
        """Negative-sample accuracy: share of clean test inputs with another test input's
        residual added that keep their true label (the authors' "cross" accuracy)."""
        test = data.test
        if len(test) < 2:
            return {}
        g = ctx.generator("bpp-negative-test")
        shift = torch.randint(1, len(test), (len(test),), generator=g)
        donors = (torch.arange(len(test)) + shift) % len(test)  # another input for each
        added = residual(test.x[donors], self.triggered(test.x[donors]))
        negative = self.triggered(test.x, lambda xf: xf + added)
        return {"negative_acc": accuracy(predict_fn(negative), test.y)}


class NegativeSamplesHook(TrainingHook):
    """BppAttack's negative samples: a share of each batch's clean rows gets another training
    image's quantisation residual and keeps its label."""

    def __init__(self, attack: Bpp) -> None:
        self.attack = attack
        self._g = generator(attack.seed, "bpp-negative")

    def on_train_start(self, module: Trainee) -> None:
        self._g = generator(self.attack.seed, "bpp-negative")  # same numbers for every run
        data = module.data
        self._donors = (~data.poison).nonzero().flatten()
        # the donors' triggered images, in the storage dtype: as much memory as those rows
        parts = [self.attack.triggered(data.x[rows]) for rows in self._donors.split(CHUNK)]
        self._triggered = torch.cat(parts) if parts else data.x[:0]

    def on_batch(self, x: Tensor, y: Tensor, pos: Tensor, module: Trainee) -> tuple[Tensor, Tensor]:
        data = module.data
        clean_rows = (~data.poison[pos.cpu()]).nonzero().flatten()
        count = min(round(len(x) * self.attack.neg_rate), len(clean_rows))
        if count == 0 or len(self._donors) == 0:
            return x, y
        rows = clean_rows[torch.randperm(len(clean_rows), generator=self._g)[:count]]
        picks = torch.randint(len(self._donors), (count,), generator=self._g)
        added = residual(data.x[self._donors[picks]], self._triggered[picks])
        x = x.clone()
        rows = rows.to(x.device)
        x[rows] = (to_float(x[rows]) + added.to(x.device)).clamp_(0, 1)
        return x, y
