"""Batched trigger building blocks shared by the patch-style attacks (pure tensor functions)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from bdrun.errors import BdrunError
from bdrun.finite import check_data

CORNERS = ("bottom_right", "bottom_left", "top_right", "top_left", "center")


def load_image(
    path: str | Path, channels: int, size: tuple[int, int] | None = None
) -> tuple[Tensor, Tensor]:
    """An image file as (pattern [C, h, w] in [0, 1], mask [1, h, w]); alpha, if any, is the mask.

    PNG/JPEG/BMP are read with Pillow (a matplotlib dependency), .npy without pickle. `size`
    resizes with nearest-neighbour so hard edges survive.
    """
    path = Path(path).expanduser()
    if not path.is_file():
        raise BdrunError(f"trigger image not found: {path}")
    if path.suffix == ".npy":
        try:
            array = np.load(path, allow_pickle=False).astype(np.float32)
        except ValueError as err:
            raise BdrunError(f"{path} is not a plain numeric .npy array ({err})") from err
        check_data(array, str(path))
        img = torch.from_numpy(array)
        if img.ndim == 2:
            img = img.unsqueeze(0)
        if img.ndim != 3:
            raise BdrunError(
                f"{path}: trigger array must be (H, W) or (C, H, W), got {tuple(img.shape)}"
            )
        if img.max() > 1:
            img = img / 255.0
        alpha = torch.ones_like(img[:1])
    else:
        from PIL import Image, UnidentifiedImageError

        try:
            with Image.open(path) as im:
                rgba = np.asarray(im.convert("RGBA"), dtype=np.float32) / 255.0
        except (UnidentifiedImageError, OSError) as err:
            raise BdrunError(f"cannot read trigger image {path}: {err}") from err
        img = torch.from_numpy(rgba).permute(2, 0, 1)
        img, alpha = img[:3], img[3:]
    if img.shape[0] == 3 and channels == 1:
        img = img.mean(0, keepdim=True)
    elif img.shape[0] == 1 and channels == 3:
        img = img.expand(3, -1, -1)
    elif img.shape[0] != channels:
        raise BdrunError(f"{path}: trigger has {img.shape[0]} channels, the data has {channels}")
    if size is not None and tuple(img.shape[1:]) != tuple(size):
        img = F.interpolate(img[None], size=size, mode="nearest")[0]
        alpha = F.interpolate(alpha[None], size=size, mode="nearest")[0]
    return img.contiguous(), alpha.contiguous()


def square_pattern(kind: str, size: int, channels: int) -> Tensor:
    """A size x size pattern: 'white' (all ones) or 'checkerboard' (1 on even i+j, 0 elsewhere)."""
    if kind == "white":
        return torch.ones(channels, size, size)
    if kind == "checkerboard":
        grid = torch.arange(size)
        return ((grid[:, None] + grid[None, :]) % 2 == 0).float().expand(channels, -1, -1).clone()
    raise BdrunError(f"attack.pattern={kind!r} must be white, checkerboard, pixel or image")


def place(
    location: str | Sequence[int], patch_hw: tuple[int, int], image_hw: tuple[int, int], margin: int
) -> tuple[int, int]:
    """(top, left) of a patch at a named corner (with `margin` pixels to the border) or [row, col]."""
    (ph, pw), (ih, iw) = patch_hw, image_hw
    if isinstance(location, str):
        if location not in CORNERS:
            raise BdrunError(
                f"attack.location={location!r} must be one of {', '.join(CORNERS)} or [row, col]"
            )
        top = {"top": margin, "bottom": ih - ph - margin, "center": (ih - ph) // 2}[
            location.split("_")[0]
        ]
        left_key = location.split("_")[-1]
        left = {"left": margin, "right": iw - pw - margin, "center": (iw - pw) // 2}[left_key]
    else:
        top, left = (int(v) for v in location)
    if top < 0 or left < 0 or top + ph > ih or left + pw > iw:
        raise BdrunError(
            f"a {ph}x{pw} trigger at {list(location) if not isinstance(location, str) else location} "
            f"(margin {margin}) does not fit {ih}x{iw} images; use a smaller attack.size or margin"
        )
    return top, left


def stamp(x: Tensor, pattern: Tensor, mask: Tensor, top: int, left: int) -> Tensor:
    """Paste pattern [C, h, w] through mask [1, h, w] at (top, left) on every image of x [N, C, H, W]."""
    out = x.clone()
    h, w = pattern.shape[1:]
    region = out[:, :, top : top + h, left : left + w]
    pattern, mask = pattern.to(x), mask.to(x)
    out[:, :, top : top + h, left : left + w] = mask * pattern + (1 - mask) * region
    return out


def blend(x: Tensor, pattern: Tensor, alpha: float) -> Tensor:
    """(1 - alpha) * x + alpha * pattern for every image of x [N, C, H, W] (pattern [C, H, W])."""
    return torch.lerp(x, pattern.to(x).expand_as(x), alpha)


def sinusoid(shape: Sequence[int], delta: float, frequency: float) -> Tensor:
    """Barni et al.'s horizontal sinusoid v(i, j) = delta * sin(2 pi j f / m) of shape [C, H, W].

    j is the column and m the image width; delta is in [0, 1] units (divide pixel units by 255).
    """
    channels, height, width = (int(s) for s in shape)
    column = torch.arange(width, dtype=torch.float32)
    wave = delta * torch.sin(2 * torch.pi * column * frequency / width)
    return wave.expand(channels, height, width).clone()


def ramp(shape: Sequence[int], delta: float) -> Tensor:
    """Barni et al.'s horizontal ramp v(i, j) = delta * j / m of shape [C, H, W], j = 0..m-1.

    As the authors' code builds it (KassemKallas/BackdoorAttack-ICIP2019, triggers.py
    `ramp_signal`: columns 0..m-1 over m, so the last column reaches delta (m-1)/m; the paper
    writes j from 1 to m). delta is in [0, 1] units (divide pixel units by 255).
    """
    channels, height, width = (int(s) for s in shape)
    column = torch.arange(width, dtype=torch.float32)
    return (delta * column / width).expand(channels, height, width).clone()


def identity_grid(height: int, width: int) -> Tensor:
    """The sampling grid [1, H, W, 2] (x, y in [-1, 1]) that grid_sample maps onto the image."""
    rows = torch.linspace(-1, 1, height)
    cols = torch.linspace(-1, 1, width)
    y, x = torch.meshgrid(rows, cols, indexing="ij")
    return torch.stack((x, y), dim=-1)[None]


def warp(x: Tensor, grid: Tensor) -> Tensor:
    """Resample images x [N, C, H, W] at grid [1 or N, H, W, 2] (bilinear, corners aligned)."""
    grid = grid.to(x)
    if grid.shape[0] != len(x):
        grid = grid.expand(len(x), -1, -1, -1)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=True)
