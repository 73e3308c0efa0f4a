"""SIG (Barni et al. 2019): a sinusoidal signal added to target-class images, labels untouched."""

from __future__ import annotations

from torch import Tensor

from bdrun.attacks.base import Attack
from bdrun.attacks.triggers import sinusoid
from bdrun.data.base import DataInfo
from bdrun.errors import BdrunError


class SIG(Attack):
    """Clean-label backdoor: x' = clip(x + v), v(i, j) = delta * sin(2 pi j f / m) on every row.

    Barni, Kallas and Tondi 2019 ("A new backdoor attack in CNNs by training set corruption
    without label poisoning") add the signal to a fraction of the *target class* training images
    and keep every label; at test time the same signal on any input triggers the target.
    Defaults follow BackdoorBench's sig config (delta 40 in 0-255 pixel units, f 6, target 0);
    the poison rate counts poisoned samples over the whole training set (see bdrun.attacks.base),
    so 0.05 is about half the target class of a balanced 10-class set.

    Parameters:
        delta: amplitude in 0-255 pixel units.
        frequency: number of periods across the image width (f).
        test_delta: amplitude at test time (Barni et al. allow a stronger test signal); null =
            `delta`.
    """

    name = "sig"

    def __init__(
        self,
        delta: float = 40.0,
        frequency: float = 6.0,
        test_delta: float | None = None,
        poison_rate: float = 0.05,
        **base,
    ) -> None:
        base.setdefault("clean_label", True)
        super().__init__(poison_rate=poison_rate, **base)
        self.delta = float(delta)
        self.frequency = float(frequency)
        self.test_delta = float(test_delta) if test_delta is not None else self.delta

    def setup(self, info: DataInfo, seed: int) -> None:
        super().setup(info, seed)
        if not self.clean_label:
            raise BdrunError("attack=sig is a clean-label attack; keep attack.clean_label=true")
        for label, value in (("delta", self.delta), ("test_delta", self.test_delta)):
            if not 0 < value <= 255:
                raise BdrunError(f"attack.{label}={value} must be in (0, 255] (pixel units)")
        self._train_signal = sinusoid(info.shape, self.delta / 255, self.frequency)
        self._test_signal = sinusoid(info.shape, self.test_delta / 255, self.frequency)

    def apply_trigger(self, x: Tensor) -> Tensor:
        return (x + self._test_signal.to(x)).clamp_(0, 1)

    def poison_images(self, x: Tensor, y: Tensor) -> Tensor:
        return (x + self._train_signal.to(x)).clamp_(0, 1)
