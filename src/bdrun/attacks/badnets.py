"""BadNets (Gu et al. 2017): a fixed patch or single pixel stamped on the image."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from bdrun.attacks.base import Attack
from bdrun.attacks.triggers import load_image, place, square_pattern, stamp
from bdrun.data.base import DataInfo
from bdrun.errors import BdrunError


class BadNets(Attack):
    """Patch trigger at a fixed place, all-to-one or all-to-all.

    Parameters:
        pattern: 'white' square, 'checkerboard', 'pixel' (one white pixel, Gu et al.'s
            single-pixel backdoor) or 'image' (the file at `image`, alpha channel as mask).
        size: side of the square patch in pixels (ignored for 'pixel'; for 'image' the file is
            resized to size x size, or kept as is when size is null).
        location: bottom_right (Gu et al.'s MNIST placement), bottom_left, top_right, top_left,
            center, or [row, col] of the patch's top-left pixel.
        margin: pixels between the patch and the image border at a named corner.
    """

    name = "badnets"

    def __init__(
        self,
        pattern: str,
        size: int | None,
        location: str | Sequence[int],
        margin: int,
        image: str | None,
        **base,
    ) -> None:
        super().__init__(**base)
        self.pattern = pattern
        self.size = size
        self.location = location if isinstance(location, str) else list(location)
        self.margin = int(margin)
        self.image = image

    def setup(self, info: DataInfo, seed: int) -> None:
        super().setup(info, seed)
        channels, height, width = info.shape
        if self.pattern == "image":
            if not self.image:
                raise BdrunError("attack.pattern=image needs attack.image=PATH")
            size = (self.size, self.size) if self.size else None
            self._pattern, self._mask = load_image(self.image, channels, size)
        else:
            side = 1 if self.pattern == "pixel" else int(self.size or 0)
            if side < 1:
                raise BdrunError(f"attack.size={self.size} must be >= 1")
            kind = "white" if self.pattern == "pixel" else self.pattern
            self._pattern = square_pattern(kind, side, channels)
            self._mask = torch.ones(1, side, side)
        patch_hw = tuple(self._pattern.shape[1:])
        self._top, self._left = place(self.location, patch_hw, (height, width), self.margin)

    def apply_trigger(self, x: Tensor) -> Tensor:
        return stamp(x, self._pattern, self._mask, self._top, self._left)

    def trigger_region(self) -> Tensor:
        assert self.info is not None, "call setup() first"
        _, height, width = self.info.shape
        region = torch.zeros(1, height, width, dtype=torch.bool)
        rows, cols = self._mask.shape[-2:]
        region[:, self._top : self._top + rows, self._left : self._left + cols] = self._mask > 0
        return region
