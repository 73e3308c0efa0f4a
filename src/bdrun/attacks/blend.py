"""Blended injection (Chen et al. 2017): a pattern mixed into the whole image with weight alpha."""

from __future__ import annotations

import torch
from torch import Tensor

from bdrun.attacks.base import Attack
from bdrun.attacks.triggers import blend, load_image
from bdrun.data.base import DataInfo
from bdrun.errors import BdrunError
from bdrun.rng import generator

PATTERNS = ("noise", "image")


def key_pattern(pattern: str, image: str | None, info: DataInfo, seed: int) -> Tensor:
    """The blend key [C, H, W]: uniform noise drawn from the run seed ('noise') or the file at
    `image` resized to the data's size ('image')."""
    channels, height, width = info.shape
    if pattern == "noise":
        return torch.rand(info.shape, generator=generator(seed, "blend-pattern"))
    if pattern == "image":
        if not image:
            raise BdrunError("attack.pattern=image needs attack.image=PATH")
        return load_image(image, channels, (height, width))[0]
    raise BdrunError(f"attack.pattern={pattern!r} must be one of {', '.join(PATTERNS)}")


class Blend(Attack):
    """x' = (1 - alpha) x + alpha k for a key pattern k covering the whole image, dirty-label.

    Chen et al. 2017 ("Targeted backdoor attacks on deep learning systems using data
    poisoning") blend a Hello Kitty image or a uniform random-noise pattern; the training and
    test blend ratios may differ. Defaults follow BackdoorBench's blended config (train and test
    alpha 0.2, 10% poisoned, target 0).

    Parameters:
        pattern: 'noise' (uniform [0, 1] per pixel and channel, drawn once from the run seed) or
            'image' (the file at `image`, resized to the data's size).
        train_alpha: blend weight of the poisoned training images.
        test_alpha: blend weight at test time (Chen et al. show a larger one raises the ASR).
    """

    name = "blend"

    def __init__(
        self,
        pattern: str,
        image: str | None,
        train_alpha: float,
        test_alpha: float,
        **base,
    ) -> None:
        super().__init__(**base)
        self.pattern = pattern
        self.image = image
        self.train_alpha = float(train_alpha)
        self.test_alpha = float(test_alpha)

    def setup(self, info: DataInfo, seed: int) -> None:
        super().setup(info, seed)
        for label, alpha in (("train_alpha", self.train_alpha), ("test_alpha", self.test_alpha)):
            if not 0 < alpha <= 1:
                raise BdrunError(f"attack.{label}={alpha} must be in (0, 1]")
        self._key = key_pattern(self.pattern, self.image, info, seed)

    def apply_trigger(self, x: Tensor) -> Tensor:
        return blend(x, self._key, self.test_alpha)

    def poison_images(self, x: Tensor, y: Tensor) -> Tensor:
        return blend(x, self._key, self.train_alpha)
