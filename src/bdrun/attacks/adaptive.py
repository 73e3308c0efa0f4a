"""Adaptive-Blend and Adaptive-Patch (Qi et al., ICLR 2023): partial triggers on relabelled
poison samples plus cover samples that carry a trigger and keep their true label.

Xiangyu Qi, Tinghao Xie, Yiming Li, Saeed Mahloujifar and Prateek Mittal, "Revisiting the
Assumption of Latent Separability for Backdoor Defenses", ICLR 2023; authors' code
github.com/vtu81/backdoor-toolbox (poison_tool_box/adaptive_blend.py, adaptive_patch.py,
config.py, README.md).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

from bdrun.attacks.base import Attack, draw_mask
from bdrun.attacks.blend import key_pattern
from bdrun.attacks.triggers import load_image, place
from bdrun.data.base import DataInfo, ImageSet
from bdrun.errors import BdrunError
from bdrun.rng import generator
from bdrun.validate import coerce, fraction

CORNER_OF_PATCH = ("top_left", "top_right", "bottom_right", "bottom_left")


class AdaptiveAttack(Attack):
    """What both adaptive attacks share: besides the relabelled poison samples (exactly
    round(poison_rate x N), drawn by `select`), exactly round(cover_rate x N) other samples of
    any class get a training trigger and keep their true label.

    The cover ("regularisation") samples stop the model from learning the trigger pattern on its
    own; only the full test-time trigger flips a prediction, and the poison samples' latent
    representations stay close to the clean ones (the paper's point). Their share among all
    triggered samples, cover / (poison + cover), is the paper's conservatism ratio. Cover samples
    are not poisoned (`Attack.cover`): the toolbox keeps them apart from the poison indices, and
    its cleansers score them as clean samples; bdrun does the same and reports how many a filter
    removed (`cover_removed`).
    """

    def __init__(self, cover_rate: float, **base) -> None:
        super().__init__(**base)
        self.cover_rate = fraction(cover_rate, "attack.cover_rate")

    def cover_count(self, n: int) -> int:
        """How many of n training samples become cover samples: round(cover_rate * n)."""
        return round(self.cover_rate * n)

    def setup(self, info: DataInfo, seed: int) -> None:
        super().setup(info, seed)
        if self.poison_rate + self.cover_rate > 1:
            raise BdrunError(
                f"attack.poison_rate={self.poison_rate} + attack.cover_rate={self.cover_rate} "
                "exceed the training set; lower them"
            )

    def select_cover(self, poisoned: Tensor, g: torch.Generator) -> Tensor:
        """Bool mask of exactly cover_count(N) samples outside `poisoned`, any class, drawn with g
        (the toolbox draws cover indices from the same shuffle, never overlapping)."""
        candidates = (~poisoned).nonzero().flatten()
        count = self.cover_count(len(poisoned))
        if count > len(candidates):
            raise BdrunError(
                f"attack.cover_rate={self.cover_rate} needs {count} samples besides the "
                f"{int(poisoned.sum())} poisoned ones but only {len(candidates)} exist; lower it"
            )
        return draw_mask(candidates, count, len(poisoned), g)

    def training_trigger(self, x: Tensor, g: torch.Generator) -> Tensor:
        """The training-time (partial) trigger on float images x, one draw per image from g."""
        raise NotImplementedError

    def poison(self, train: ImageSet, g: torch.Generator) -> ImageSet:
        """Poison samples triggered and relabelled, cover samples triggered with their labels
        kept; `self.cover` holds the cover mask afterwards."""
        mask = self.select(train.y, g)
        cover = self.select_cover(mask, g)
        x, y = train.x.clone(), train.y.clone()
        for chosen in (mask, cover):
            if chosen.any():
                x[chosen] = self.triggered(train.x[chosen], lambda xf: self.training_trigger(xf, g))
        y[mask] = self.backdoor_label(train.y[mask])
        self.cover = cover
        return train.replace(x=x, y=y, poison=mask, orig_y=train.orig_y.clone())


def piece_map(height: int, width: int, pieces: int) -> Tensor:
    """Long [H, W]: the piece (0 .. pieces - 1, row-major) of each pixel when the image is cut
    into a sqrt(pieces) x sqrt(pieces) grid (rows and columns split as evenly as they go)."""
    side = math.isqrt(pieces)
    rows = torch.arange(height) * side // height
    cols = torch.arange(width) * side // width
    return rows[:, None] * side + cols[None, :]


class AdaptiveBlend(AdaptiveAttack):
    """Adaptive-Blend: a blended key cut into `pieces` grid pieces; every poison and cover
    sample is blended (alpha `train_alpha`) through a random half of the pieces, test inputs
    with the whole key at `test_alpha`.

    Defaults, from the toolbox: poison and cover rate 0.003 and train alpha 0.15 (README.md,
    the Adaptive-Blend commands `-poison_rate 0.003 -cover_rate 0.003 -alpha 0.15`), test alpha
    0.2 (README.md `-test_alpha 0.2`), 16 pieces of which round(0.5 x 16) = 8 are masked per
    sample (adaptive_blend.py `pieces=16, mask_rate=0.5`, as create_poisoned_set.py passes them).
    Their key is hellokitty_32.png; this machine has no copy, so the key is Blend's: uniform
    noise from the run seed, or `pattern: image` with `image: PATH`. The toolbox requires the
    side to be a multiple of sqrt(pieces); bdrun splits rows and columns as evenly as they go.
    BackdoorBench has no adaptive attacks.

    Parameters:
        cover_rate: cover samples / all training samples (trigger, true label).
        pattern, image: the key, as Blend's ('noise' | 'image').
        train_alpha, test_alpha: blend weights of training (poison and cover) and test images.
        pieces: a square number of grid pieces (16 = 4 x 4).
        mask_rate: share of the pieces masked (left out) per training image.
    """

    name = "adaptive_blend"

    def __init__(
        self,
        pattern: str,
        image: str | None,
        train_alpha: float,
        test_alpha: float,
        pieces: int,
        mask_rate: float,
        **base,
    ) -> None:
        super().__init__(**base)
        self.pattern = pattern
        self.image = image
        self.train_alpha = fraction(train_alpha, "attack.train_alpha")
        self.test_alpha = fraction(test_alpha, "attack.test_alpha")
        self.pieces = coerce(pieces, "int", "attack.pieces")
        self.mask_rate = fraction(mask_rate, "attack.mask_rate")

    def setup(self, info: DataInfo, seed: int) -> None:
        super().setup(info, seed)
        for label, alpha in (("train_alpha", self.train_alpha), ("test_alpha", self.test_alpha)):
            if alpha == 0:
                raise BdrunError(f"attack.{label}=0 blends nothing; use (0, 1], e.g. 0.15")
        side = math.isqrt(max(self.pieces, 0))
        _, height, width = info.shape
        if self.pieces < 1 or side * side != self.pieces:
            raise BdrunError(f"attack.pieces={self.pieces} must be a square number, e.g. 16")
        if side > min(height, width):
            raise BdrunError(
                f"attack.pieces={self.pieces} cuts {height}x{width} images into pieces smaller "
                f"than a pixel; use at most {min(height, width) ** 2}"
            )
        self.masked_pieces = round(self.mask_rate * self.pieces)
        if self.masked_pieces >= self.pieces:
            raise BdrunError(
                f"attack.mask_rate={self.mask_rate} masks all {self.pieces} pieces; lower it"
            )
        self._key = key_pattern(self.pattern, self.image, info, seed)
        self._pieces = piece_map(height, width, self.pieces)

    def piece_masks(self, count: int, g: torch.Generator) -> Tensor:
        """Float [count, 1, H, W]: 1 on the pieces each image keeps (all but masked_pieces of
        them, a fresh random choice per image), 0 on the masked ones."""
        order = torch.rand(count, self.pieces, generator=g).argsort(1)
        kept = torch.ones(count, self.pieces)
        kept.scatter_(1, order[:, : self.masked_pieces], 0.0)
        return kept[:, self._pieces][:, None]

    def apply_trigger(self, x: Tensor) -> Tensor:
        return torch.lerp(x, self._key.to(x).expand_as(x), self.test_alpha)

    def training_trigger(self, x: Tensor, g: torch.Generator) -> Tensor:
        weight = self.train_alpha * self.piece_masks(len(x), g).to(x)
        return x + weight * (self._key.to(x) - x)


def generated_patches(
    info: DataInfo, side: int, margin: int, seed: int
) -> list[tuple[Tensor, Tensor]]:
    """Four full-size (pattern [C, H, W], mask [1, H, W]) patch triggers, one per corner: a
    checkerboard, seeded uniform noise, a white square and a ring, each side x side.

    Stand-ins for the toolbox's four PNG triggers (phoenix_corner, firefox_corner,
    badnet_patch4, trojan_square), of which this machine has no copy."""
    channels, height, width = info.shape
    grid = torch.arange(side)
    checker = ((grid[:, None] + grid[None, :]) % 2 == 0).float().expand(channels, -1, -1)
    noise = torch.rand(channels, side, side, generator=generator(seed, "adaptive-patch-noise"))
    white = torch.ones(channels, side, side)
    edge = (grid == 0) | (grid == side - 1)
    ring = (edge[:, None] | edge[None, :]).float().expand(channels, -1, -1)
    out = []
    for pattern, corner in zip((checker, noise, white, ring), CORNER_OF_PATCH, strict=True):
        top, left = place(corner, (side, side), (height, width), margin)
        full, mask = torch.zeros(channels, height, width), torch.zeros(1, height, width)
        full[:, top : top + side, left : left + side] = pattern
        mask[:, top : top + side, left : left + side] = 1
        out.append((full, mask))
    return out


def file_patch(path: str, info: DataInfo) -> tuple[Tensor, Tensor]:
    """A full-size trigger image and its mask: the PNG alpha times its non-black pixels (the
    toolbox masks out black pixels when no mask file comes with a trigger)."""
    channels, height, width = info.shape
    pattern, alpha = load_image(path, channels, (height, width))
    return pattern, alpha * (pattern.amax(0, keepdim=True) > 0).float()


class AdaptivePatch(AdaptiveAttack):
    """Adaptive-Patch: k patch triggers; each poison and cover sample carries one of them (the
    i-th of n chosen samples the trigger floor(i k / n)) at its training opacity, test inputs
    carry `test_triggers` at `test_alphas`.

    Defaults, from the toolbox: poison rate 0.003 and cover rate 0.006 (README.md, the CIFAR-10
    command `-poison_rate 0.003 -cover_rate 0.006`); four triggers with training opacities
    0.5, 0.2, 0.5, 0.3 (config.py adaptive_patch_train_trigger_alphas); at test time two of them
    at opacity 1 (config.py adaptive_patch_test_trigger_names / _alphas: CIFAR-10 a moved copy
    of trigger 0 and trigger 2, GTSRB triggers 1 and 3); bdrun takes triggers 0 and 2 as they
    are. The toolbox's triggers are PNG files this machine has no copy of: bdrun draws four
    square patches of side `size` at the four corners (`generated_patches`); `images` takes four
    files of your own (full-size trigger images; their alpha and non-black pixels are the mask,
    as the toolbox's default mask). BackdoorBench has no adaptive attacks.

    Parameters:
        cover_rate: cover samples / all training samples (trigger, true label).
        images: null (generated patches) or a list of k trigger image files.
        size, margin: side of the generated patches in pixels and their distance to the border.
        alphas: training opacity of each trigger (k values).
        test_triggers: indices of the triggers stamped at test time.
        test_alphas: their opacities.
    """

    name = "adaptive_patch"

    def __init__(
        self,
        images: Sequence[str] | None,
        size: int,
        margin: int,
        alphas: Sequence[float],
        test_triggers: Sequence[int],
        test_alphas: Sequence[float],
        **base,
    ) -> None:
        super().__init__(**base)
        self.images = None if images is None else [str(p) for p in images]
        self.size = coerce(size, "int", "attack.size")
        self.margin = coerce(margin, "int", "attack.margin")
        self.alphas = [fraction(a, "attack.alphas") for a in alphas]
        self.test_triggers = [coerce(i, "int", "attack.test_triggers") for i in test_triggers]
        self.test_alphas = [fraction(a, "attack.test_alphas") for a in test_alphas]

    def setup(self, info: DataInfo, seed: int) -> None:
        super().setup(info, seed)
        if self.images is None:
            if self.size < 1 or self.margin < 0:
                raise BdrunError(
                    f"attack.size={self.size} must be >= 1 and attack.margin={self.margin} >= 0"
                )
            _, height, width = info.shape
            if 2 * (self.size + self.margin) > min(height, width):
                raise BdrunError(
                    f"attack.size={self.size} with attack.margin={self.margin}: the four corner "
                    f"patches overlap on {height}x{width} images; use a smaller size"
                )
            triggers = generated_patches(info, self.size, self.margin, seed)
        else:
            if not self.images:
                raise BdrunError("attack.images=[] names no trigger file; give a list or null")
            triggers = [file_patch(path, info) for path in self.images]
        k = len(triggers)
        if len(self.alphas) != k:
            raise BdrunError(f"attack.alphas has {len(self.alphas)} values for {k} triggers")
        if not self.test_triggers or len(self.test_alphas) != len(self.test_triggers):
            raise BdrunError(
                f"attack.test_triggers={self.test_triggers} and attack.test_alphas="
                f"{self.test_alphas} must be non-empty lists of the same length"
            )
        if any(not 0 <= i < k for i in self.test_triggers):
            raise BdrunError(f"attack.test_triggers={self.test_triggers} must be in 0..{k - 1}")
        if any(a == 0 for a in [*self.alphas, *self.test_alphas]):
            raise BdrunError("attack.alphas and attack.test_alphas must be > 0 (0 stamps nothing)")
        for index, (_, mask) in enumerate(triggers):
            if not mask.any():
                raise BdrunError(f"attack.images[{index}] is all black or transparent: no trigger")
        self.patterns = torch.stack([pattern for pattern, _ in triggers])  # [k, C, H, W]
        self.masks = torch.stack([mask for _, mask in triggers])  # [k, 1, H, W]

    def stamp(self, x: Tensor, which: Tensor, alphas: Tensor) -> Tensor:
        """x + alpha * mask * (pattern - x) with trigger `which[i]` and opacity `alphas[i]` per image."""
        weight = alphas.to(x).view(-1, 1, 1, 1) * self.masks.to(x)[which]
        return x + weight * (self.patterns.to(x)[which] - x)

    def apply_trigger(self, x: Tensor) -> Tensor:
        out = x
        for index, alpha in zip(self.test_triggers, self.test_alphas, strict=True):
            out = out + alpha * self.masks[index].to(x) * (self.patterns[index].to(x) - out)
        return out

    def trigger_region(self) -> Tensor:
        return (self.masks.sum(0) > 0).bool()

    def training_trigger(self, x: Tensor, g: torch.Generator) -> Tensor:
        k, n = len(self.patterns), len(x)
        which = torch.arange(n) * k // max(n, 1)
        return self.stamp(x, which, torch.tensor(self.alphas)[which])
