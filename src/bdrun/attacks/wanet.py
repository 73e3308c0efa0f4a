"""WaNet (Nguyen & Tran 2021): an imperceptible smooth warp as the trigger, with a noise mode."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import Tensor

from bdrun.attacks.base import Attack
from bdrun.attacks.triggers import identity_grid, warp
from bdrun.data.base import DataInfo, to_float
from bdrun.errors import BdrunError
from bdrun.metrics import accuracy
from bdrun.rng import generator
from bdrun.training import Trainee, TrainingHook

if TYPE_CHECKING:
    from bdrun.context import RunContext
    from bdrun.state import RunData


def warping_field(k: int, height: int, width: int, g: torch.Generator) -> Tensor:
    """The random field [1, H, W, 2] of the authors' code: uniform k x k control offsets in
    [-1, 1], scaled to mean absolute value 1, upsampled bicubically to the image size."""
    control = torch.rand(1, 2, k, k, generator=g) * 2 - 1
    control = control / control.abs().mean()
    field = F.interpolate(control, size=(height, width), mode="bicubic", align_corners=True)
    return field.permute(0, 2, 3, 1)


class WaNet(Attack):
    """Warping-based backdoor: every triggered image is resampled through one fixed warping grid.

    Nguyen and Tran 2021 ("WaNet -- Imperceptible Warping-based Backdoor Attack"). Defaults are
    the authors' (config.py of their release and BackdoorBench's wanet config): k = 4 control
    points per side, strength s = 0.5, grid_rescale = 1, poison rate 0.1, cross_ratio = 2.

    The backdoor samples (exactly round(poison_rate * N), the ground-truth poison mask) are
    warped and relabelled in the training tensors. The noise mode acts per batch through a
    training hook: in every batch, round(batch * poison_rate * cross_ratio) clean samples are
    warped with the backdoor grid plus fresh random noise and keep their labels, which forces the
    network to learn the exact warp rather than warping in general. The authors draw both kinds
    afresh in each batch; here the backdoor samples are fixed so that defenses can be scored
    against the mask.

    Parameters:
        k: control grid size; the warp is smooth between the k x k control points.
        s: warping strength (maximum displacement about s / H of the image, in grid units).
        grid_rescale: scales the warped grid (the authors use 1; < 1 keeps samples inside).
        cross_ratio: noise-mode samples per backdoor sample (rho_n = cross_ratio * rho_a).
    """

    name = "wanet"

    def __init__(
        self,
        k: int,
        s: float,
        grid_rescale: float,
        cross_ratio: float,
        **base,
    ) -> None:
        super().__init__(**base)
        self.k = int(k)
        self.s = float(s)
        self.grid_rescale = float(grid_rescale)
        self.cross_ratio = float(cross_ratio)

    def setup(self, info: DataInfo, seed: int) -> None:
        super().setup(info, seed)
        if self.k < 2:
            raise BdrunError(f"attack.k={self.k} must be >= 2 (control points per side)")
        if self.cross_ratio < 0 or self.s < 0 or self.grid_rescale <= 0:
            raise BdrunError(
                "attack.cross_ratio and attack.s must be >= 0, attack.grid_rescale > 0"
            )
        _, height, width = info.shape
        self.seed = seed
        field = warping_field(self.k, height, width, generator(seed, "wanet-field"))
        # displacement in grid units (the image spans [-1, 1]): s / size, per axis
        scale = torch.tensor([self.s / width, self.s / height])
        self.grid = ((identity_grid(height, width) + field * scale) * self.grid_rescale).clamp(
            -1, 1
        )

    def apply_trigger(self, x: Tensor) -> Tensor:
        return warp(x, self.grid)

    def noisy_grids(self, count: int, g: torch.Generator) -> Tensor:
        """`count` backdoor grids with uniform noise of up to one pixel added (noise mode)."""
        _, height, width = self.grid.shape[:3]
        noise = torch.rand(count, height, width, 2, generator=g) * 2 - 1
        pixel = torch.tensor([1 / width, 1 / height])
        return (self.grid + noise * pixel).clamp(-1, 1)

    def training_hooks(self) -> list[TrainingHook]:
        return [WarpNoiseHook(self)] if self.cross_ratio > 0 else []

    def evaluate(
        self, predict_fn: Callable[[Tensor], Tensor], data: RunData, ctx: RunContext
    ) -> dict[str, float]:
        """Noise-mode accuracy: share of test inputs warped with a noisy grid that keep their
        true label (the authors' "cross" accuracy; high means the backdoor is warp-specific)."""
        test = data.test
        grids = self.noisy_grids(len(test), ctx.generator("wanet-noise-test"))
        noisy = self.triggered(test.x, lambda xf: warp(xf, grids))
        return {"noise_acc": accuracy(predict_fn(noisy), test.y)}


class WarpNoiseHook(TrainingHook):
    """WaNet's noise mode: warps a share of each batch's clean samples with noisy grids."""

    def __init__(self, attack: WaNet) -> None:
        self.attack = attack
        self.share = attack.poison_rate * attack.cross_ratio
        self._g = generator(attack.seed, "wanet-noise")

    def on_train_start(self, module: Trainee) -> None:
        self._g = generator(self.attack.seed, "wanet-noise")  # same numbers for every run

    def on_batch(self, x: Tensor, y: Tensor, pos: Tensor, module: Trainee) -> tuple[Tensor, Tensor]:
        clean_rows = (~module.data.poison[pos.cpu()]).nonzero().flatten()
        count = min(round(len(x) * self.share), len(clean_rows))
        if count == 0:
            return x, y
        rows = clean_rows[torch.randperm(len(clean_rows), generator=self._g)[:count]]
        grids = self.attack.noisy_grids(count, self._g)
        x = x.clone()
        rows = rows.to(x.device)
        x[rows] = warp(to_float(x[rows]), grids)
        return x, y
