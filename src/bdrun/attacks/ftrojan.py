"""FTrojan (Wang et al. 2022): a trigger in fixed mid and high DCT frequencies of the UV channels."""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

from bdrun.attacks.base import Attack
from bdrun.data.base import DataInfo
from bdrun.errors import BdrunError
from bdrun.validate import at_least, coerce, flag

AUTHORS_WINDOW = 32  # the authors' block size, on 32 x 32 images; positions are given in it

# OpenCV's RGB -> YCrCb for 8-bit images (cv2.COLOR_RGB2YCrCb, what the authors call YUV):
# Y = .299 R + .587 G + .114 B, Cr = .713 (R - Y) + 128, Cb = .564 (B - Y) + 128
_Y = torch.tensor([0.299, 0.587, 0.114])
RGB_TO_YCRCB = torch.stack(
    [_Y, 0.713 * (torch.tensor([1.0, 0.0, 0.0]) - _Y), 0.564 * (torch.tensor([0.0, 0.0, 1.0]) - _Y)]
)
CHROMA_OFFSET = torch.tensor([0.0, 128 / 255, 128 / 255])


def rgb_to_ycrcb(x: Tensor) -> Tensor:
    """Images [N, 3, H, W] in [0, 1] to Y, Cr, Cb (OpenCV's constants, on the [0, 1] scale)."""
    matrix = RGB_TO_YCRCB.to(x)
    return torch.einsum("ij,njhw->nihw", matrix, x) + CHROMA_OFFSET.to(x).view(1, 3, 1, 1)


def ycrcb_to_rgb(x: Tensor) -> Tensor:
    """The exact inverse of rgb_to_ycrcb (OpenCV's inverse uses rounded constants)."""
    inverse = torch.linalg.inv(RGB_TO_YCRCB.double()).to(x)
    return torch.einsum("ij,njhw->nihw", inverse, x - CHROMA_OFFSET.to(x).view(1, 3, 1, 1))


def dct_matrix(size: int) -> Tensor:
    """The orthonormal DCT-II matrix D [size, size] (cv2.dct of a block X is D X D^T)."""
    n = torch.arange(size, dtype=torch.float64)
    d = torch.cos(math.pi * (2 * n[None, :] + 1) * n[:, None] / (2 * size)) * math.sqrt(2 / size)
    d[0] /= math.sqrt(2)
    return d.float()


def _blocks(x: Tensor, window: int) -> Tensor:
    n, c, height, width = x.shape
    return x.reshape(n, c, height // window, window, width // window, window)


def block_dct(x: Tensor, window: int) -> Tensor:
    """The 2-D DCT of every window x window block of x [N, C, H, W] (the authors' `DCT`),
    coefficients in place of their block's pixels."""
    d = dct_matrix(window).to(x)
    return torch.einsum("ij,ncajbk,lk->ncaibl", d, _blocks(x, window), d).reshape(x.shape)


def block_idct(x: Tensor, window: int) -> Tensor:
    """The inverse of block_dct (the authors' `IDCT`)."""
    d = dct_matrix(window).to(x)
    return torch.einsum("ij,ncaibl,lk->ncajbk", d, _blocks(x, window), d).reshape(x.shape)


def auto_window(height: int, width: int) -> int:
    """The authors' 32 where it divides both sides, else the largest common divisor of the
    sides up to 32 (28 x 28 images: one 28 x 28 block)."""
    return max(w for w in range(1, AUTHORS_WINDOW + 1) if height % w == 0 and width % w == 0)


def scaled_position(position: int, window: int) -> int:
    """A coefficient index of the authors' 32-wide block mapped onto a block of `window`:
    the same share of the frequency range, round(p * (window - 1) / 31); 15 -> 13 and
    31 -> 27 on 28 x 28 images."""
    return round(position * (window - 1) / (AUTHORS_WINDOW - 1))


class FTrojan(Attack):
    """FTrojan: a fixed magnitude added to chosen DCT coefficients of every block of the image's
    chroma channels, dirty-label.

    Wang et al., "An Invisible Black-box Backdoor Attack through Frequency Domain", ECCV 2022;
    authors' code SoftWiser-group/FTrojan. The trigger (data.py `poison_frequency`): images in
    0-255 converted to YUV (OpenCV's YCrCb), a block DCT over window x window blocks, the
    magnitude added at each position of `positions` in each block of the chosen channels, the
    inverse DCT and colour conversion, clipped to [0, 1]. Defaults: window 32, positions (15, 15)
    (mid frequency) and (31, 31) (high frequency), the UV channels [1, 2] (train.py's `param`).
    Magnitude 30 and poison rate 0.1 with target 0 as BackdoorBench's ftrojann config (the
    authors' train.py uses magnitude 20, poisoning rate 0.02 and target 8 on CIFAR-10); the
    YAML switches them.

    Grey images (one channel) take the trigger in their single channel, with no colour
    conversion. Images whose sides 32 does not divide (28 x 28) use one block per
    `auto_window` and the positions scaled onto it (`scaled_position`): (13, 13) and (27, 27)
    on 28 x 28, the same share of the frequency range and the highest frequency kept highest.

    The DCT and the colour conversion are linear, so the trigger is one fixed additive pattern
    (computed once in `setup`, through the transforms) and a clamp. The authors cast to uint8
    after each colour conversion, which truncates and wraps values outside 0-255; here every
    step stays in floats and only the result is clamped.

    Parameters:
        magnitude: added to each chosen coefficient, in 0-255 pixel units.
        positions: [row, col] coefficient indices in the authors' 32 x 32 block (0..31).
        window: block size of the DCT; `auto` (see above) or a divisor of both image sides.
        channels: the YCrCb channels of colour images to change (0 = Y, 1 = Cr, 2 = Cb).
        yuv: convert colour images to YCrCb first (true, the authors' default) or use RGB.
    """

    name = "ftrojan"

    def __init__(
        self,
        magnitude: float,
        positions: list[list[int]],
        window: Any,
        channels: list[int],
        yuv: bool,
        **base,
    ) -> None:
        super().__init__(**base)
        self.magnitude = magnitude
        self.positions = positions
        self.window = window
        self.channels = channels
        self.yuv = yuv

    def setup(self, info: DataInfo, seed: int) -> None:
        super().setup(info, seed)
        self.magnitude = coerce(self.magnitude, "float", "attack.magnitude")
        if self.magnitude == 0:
            raise BdrunError("attack.magnitude=0 adds no trigger; use e.g. 30 (0-255 units)")
        self.yuv = flag(self.yuv, "yuv", group="attack")
        colour, height, width = info.shape
        window = self.window_size = self._check_window(height, width)
        positions = self._check_positions()
        if colour == 1:
            changed: list[int] = [0]
        else:
            changed = self._check_channels(colour)
            if self.yuv and colour != 3:
                raise BdrunError(f"attack.yuv=true needs 3 colour channels, not {colour}")
        coefficients = torch.zeros(1, colour, height, width)
        for row, col in positions:
            r, c = scaled_position(row, window), scaled_position(col, window)
            coefficients[0, changed, r::window, c::window] += self.magnitude / 255
        pattern = block_idct(coefficients, window)
        if colour == 3 and self.yuv:
            # the offset cancels: x' = C^-1 (C x + o + P - o) = x + C^-1 P
            pattern = ycrcb_to_rgb(pattern + CHROMA_OFFSET.view(1, 3, 1, 1))
        self._pattern = pattern[0]

    def _check_window(self, height: int, width: int) -> int:
        if self.window == "auto":
            return auto_window(height, width)
        window = at_least(self.window, "int", "window", 2, "auto or 32", group="attack")
        if height % window or width % window:
            raise BdrunError(
                f"attack.window={window} does not divide the {height}x{width} images; "
                "use attack.window=auto"
            )
        return window

    def _check_positions(self) -> list[tuple[int, int]]:
        message = (
            f"attack.positions={self.positions!r} must be a non-empty list of [row, col] "
            f"pairs in 0..{AUTHORS_WINDOW - 1}, e.g. [[15,15],[31,31]]"
        )
        try:
            pairs = [tuple(coerce(v, "int", "attack.positions") for v in p) for p in self.positions]
        except (TypeError, BdrunError):
            raise BdrunError(message) from None
        if not pairs or any(
            len(p) != 2 or not all(0 <= v < AUTHORS_WINDOW for v in p) for p in pairs
        ):
            raise BdrunError(message)
        return pairs  # type: ignore[return-value]

    def _check_channels(self, colour: int) -> list[int]:
        message = (
            f"attack.channels={self.channels!r} must be a non-empty list of channel indices "
            f"in 0..{colour - 1}, e.g. [1, 2] (Cr, Cb)"
        )
        try:
            channels = [coerce(c, "int", "attack.channels") for c in self.channels]
        except (TypeError, BdrunError):
            raise BdrunError(message) from None
        if not channels or not all(0 <= c < colour for c in channels):
            raise BdrunError(message)
        return sorted(set(channels))

    def apply_trigger(self, x: Tensor) -> Tensor:
        return (x + self._pattern.to(x)).clamp_(0, 1)
