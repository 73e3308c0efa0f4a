"""SIG (Barni et al. 2019): a sinusoid or ramp added to target-class images, labels untouched."""

from __future__ import annotations

from torch import Tensor

from bdrun.attacks.base import Attack
from bdrun.attacks.triggers import ramp, sinusoid
from bdrun.data.base import DataInfo
from bdrun.errors import BdrunError

SIGNALS = ("sine", "ramp")


class SIG(Attack):
    """Clean-label backdoor: x' = clip(x + v), v(i, j) = delta * sin(2 pi j f / m) on every row.

    Barni, Kallas and Tondi 2019 ("A new backdoor attack in CNNs by training set corruption
    without label poisoning", ICIP 2019) add the signal to a fraction of the *target class*
    training images and keep every label; at test time the same signal on any input triggers the
    target. The paper has two signals: the sinusoid above and the ramp v(i, j) = delta * j / m
    (`signal`), the default trigger of their code (KassemKallas/BackdoorAttack-ICIP2019,
    parameters.py `trigger = 'ramp'`, triggers.py `ramp_signal`; see triggers.ramp). Their
    utils.py casts x + v to uint8 before clipping, which wraps sums above 255; we clamp.
    Defaults follow BackdoorBench's sig config (delta 40 in 0-255 pixel units, f 6, target 0);
    the poison rate counts poisoned samples over the whole training set (see bdrun.attacks.base),
    so 0.05 is about half the target class of a balanced 10-class set.

    Parameters:
        delta: amplitude in 0-255 pixel units.
        frequency: number of periods across the image width (f); the sinusoid only.
        test_delta: amplitude at test time (Barni et al. allow a stronger test signal); null =
            `delta`.
        signal: "sine" (BackdoorBench's sig) or "ramp" (the default of Barni et al.'s code).
    """

    name = "sig"
    clean_label = True

    def __init__(
        self,
        delta: float,
        frequency: float,
        test_delta: float | None,
        poison_rate: float,
        signal: str,
        **base,
    ) -> None:
        # clean-label: the poisons keep their (target) label, so the attack is all-to-one
        super().__init__(poison_rate=poison_rate, label_mode="all2one", **base)
        self.delta = float(delta)
        self.frequency = float(frequency)
        self.test_delta = float(test_delta) if test_delta is not None else self.delta
        if signal not in SIGNALS:
            raise BdrunError(f"attack.signal={signal!r} must be one of {', '.join(SIGNALS)}")
        self.signal = signal

    def setup(self, info: DataInfo, seed: int) -> None:
        super().setup(info, seed)
        for label, value in (("delta", self.delta), ("test_delta", self.test_delta)):
            if not 0 < value <= 255:
                raise BdrunError(f"attack.{label}={value} must be in (0, 255] (pixel units)")
        self._train_signal = self.make_signal(info, self.delta)
        self._test_signal = self.make_signal(info, self.test_delta)

    def make_signal(self, info: DataInfo, delta: float) -> Tensor:
        """The additive signal [C, H, W] of amplitude `delta` (pixel units) in [0, 1] units."""
        if self.signal == "ramp":
            return ramp(info.shape, delta / 255)
        return sinusoid(info.shape, delta / 255, self.frequency)

    def apply_trigger(self, x: Tensor) -> Tensor:
        return (x + self._test_signal.to(x)).clamp_(0, 1)

    def poison_images(self, x: Tensor, y: Tensor) -> Tensor:
        return (x + self._train_signal.to(x)).clamp_(0, 1)
