"""Low-frequency attack (Zeng et al. 2021): a smooth universal adversarial perturbation as the
trigger, optimised on a surrogate of the clean data."""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from bdrun.attacks.base import Attack
from bdrun.data.base import DataInfo, ImageSet, to_float
from bdrun.errors import BdrunError
from bdrun.validate import at_least, fraction, positive

if TYPE_CHECKING:
    from bdrun.context import RunContext

log = logging.getLogger(__name__)


def gaussian_low_pass(v: Tensor, sigma: float) -> Tensor:
    """The authors' pre-set low-pass filter (gauss_smooth.py `gauss_smooth`) on v [C, H, W]: a
    separable Gaussian of standard deviation `sigma` pixels over round(5 sigma) taps, zero
    padding, output of the input's size."""
    taps = max(1, round(5 * sigma))
    offsets = torch.arange(taps, dtype=torch.float32) - (taps - 1) / 2
    kernel = torch.exp(-0.5 * (offsets / sigma) ** 2)
    kernel = (kernel / kernel.sum()).to(v)
    before, after = taps // 2 - (1 - taps % 2), taps // 2
    channels = v.shape[0]
    out = F.pad(v[None], (before, after, before, after))
    out = F.conv2d(out, kernel.view(1, 1, taps, 1).expand(channels, 1, taps, 1), groups=channels)
    out = F.conv2d(out, kernel.view(1, 1, 1, taps).expand(channels, 1, 1, taps), groups=channels)
    return out[0]


def rescale(v: Tensor, amplitude: float) -> Tensor:
    """v shifted and scaled to span [0, amplitude] (the authors' `normalization`); a constant
    v is returned unchanged."""
    span = v.max() - v.min()
    if span <= 0:
        return v
    return (v - v.min()) / span * amplitude


def targeted_deepfool(
    model: nn.Module, x: Tensor, target: int, overshoot: float, max_steps: int
) -> tuple[Tensor, int]:
    """Targeted DeepFool (the authors' deepfool.py `tar_deepfool`): linearise the gap between the
    target's logit and that of x's original label, step across it, repeat until the model
    says `target` or after max_steps. Returns the perturbation (times 1 + overshoot) and the
    steps taken. x: one image [C, H, W]."""
    x = x[None]
    with torch.no_grad():
        start_label = int(model(x).argmax(1))
    total = torch.zeros_like(x)
    perturbed = x
    steps = 0
    while steps < max_steps:
        perturbed = perturbed.detach().requires_grad_(True)
        logits = model(perturbed)[0]
        if int(logits.argmax()) == target:
            break
        gap = logits[target] - logits[start_label]
        (direction,) = torch.autograd.grad(gap, perturbed)
        step = gap.detach().abs() / direction.pow(2).sum() * direction
        if torch.isfinite(step).all():
            total = total + step
        perturbed = x + (1 + overshoot) * total
        steps += 1
    return ((1 + overshoot) * total)[0].detach(), steps


class LowFrequency(Attack):
    """Low-frequency (smooth) trigger: a universal perturbation pushed towards the target label
    on a surrogate model, low-pass filtered at every update; added to images and clamped,
    dirty-label.

    Zeng, Park, Mao and Jia, "Rethinking the Backdoor Attacks' Triggers: A Frequency
    Perspective", ICCV 2021; authors' code YiZeng623/frequency-backdoor, Sec5_Smooth_Trigger
    (universal_pert.py, deepfool.py, gauss_smooth.py, target_universal.py). The algorithm is the
    universal adversarial perturbation of Moosavi-Dezfooli et al.: in passes over `samples`
    clean training images in a random order, each image whose label the current trigger v does
    not change gets a targeted DeepFool step r, and v becomes rescale(low_pass(v +
    low_pass(r))), spanning [0, amplitude]; a pass ends with the fooling rate (share of the
    samples whose predicted label the trigger changes); the search stops once it reaches
    `fooling_rate` or after `passes` passes, and keeps the v of the best rate.

    Defaults from the authors' code: 100 training samples, delta 0.8 (stop at a fooling rate of
    0.2), DeepFool at most 200 steps with overshoot 0.02, Gaussian sigma 6 pixels, amplitude 0.2.
    The authors search without a pass limit; `passes` 50 and `patience` 5 are BackdoorBench's
    (resource/lowFrequency/generate_pattern.py, universal_pert.py). The authors let the
    trigger pick the dominant label it fools towards as the target; here, as in BackdoorBench,
    the target is the configured one (all-to-all: each sample's backdoor label). Their code
    applies v unclamped while searching; here the search sees x + v clamped, as poisoned
    images are. Poison rate 0.1 and target 0 as BackdoorBench's lf config.

    The surrogate is a model of the configured architecture trained on the clean training set
    (`ctx.train_cached`, stream "surrogate", cached and shared with the label-consistent
    attack's); the samples and their order come from the run's seed, so the trigger is fixed by
    the seed.

    Parameters:
        samples: clean training images the trigger is optimised on.
        passes: most passes over them.
        patience: stop when this many passes' fooling rates lie within 0.01 (0 = never).
        fooling_rate: stop once the trigger changes this share of the samples' labels.
        deepfool_steps, overshoot: DeepFool's step limit and overshoot.
        sigma: the low-pass Gaussian's standard deviation in pixels.
        amplitude: the trigger spans [0, amplitude] (pixel values in [0, 1]).
    """

    name = "lf"

    def __init__(
        self,
        samples: int,
        passes: int,
        fooling_rate: float,
        deepfool_steps: int,
        overshoot: float,
        patience: int,
        sigma: float,
        amplitude: float,
        **base,
    ) -> None:
        super().__init__(**base)
        self.samples = samples
        self.passes = passes
        self.fooling_rate = fooling_rate
        self.deepfool_steps = deepfool_steps
        self.overshoot = overshoot
        self.patience = patience
        self.sigma = sigma
        self.amplitude = amplitude
        self._trigger: Tensor | None = None

    def setup(self, info: DataInfo, seed: int) -> None:
        super().setup(info, seed)
        self.samples = at_least(self.samples, "int", "samples", 1, 100, group="attack")
        self.passes = at_least(self.passes, "int", "passes", 1, 50, group="attack")
        self.fooling_rate = fraction(self.fooling_rate, "attack.fooling_rate")
        self.deepfool_steps = at_least(
            self.deepfool_steps, "int", "deepfool_steps", 1, 200, group="attack"
        )
        self.overshoot = at_least(self.overshoot, "float", "overshoot", 0, 0.02, group="attack")
        self.patience = at_least(self.patience, "int", "patience", 0, 5, group="attack")
        self.sigma = positive(self.sigma, "sigma", 6, group="attack")
        self.amplitude = positive(self.amplitude, "amplitude", 0.2, group="attack")
        if self.amplitude > 1:
            raise BdrunError(f"attack.amplitude={self.amplitude} must be in (0, 1], e.g. 0.2")

    def fit(self, clean_train: ImageSet, test: ImageSet, ctx: RunContext) -> None:
        surrogate, _ = ctx.train_cached(clean_train, stream="surrogate")
        rows = torch.randperm(len(clean_train), generator=ctx.generator("lf-samples"))
        rows = rows[: self.samples]
        x = to_float(clean_train.x[rows]).to(ctx.device)
        targets = self.backdoor_label(clean_train.y[rows])

        def search() -> Tensor:
            model = surrogate.to(ctx.device).eval()
            try:
                trigger, rate = self.search(model, x, targets, ctx.generator("lf-order"))
            finally:
                model.to("cpu")
            log.info("lf trigger: fooling rate %.3f on the surrogate's %d samples", rate, len(x))
            return trigger

        # the DeepFool search runs once per surrogate, samples and settings; every defense of
        # a sweep reuses it
        self._trigger, _ = ctx.tensor_cached(
            "lf trigger",
            search,
            {
                "weights": surrogate.state_dict(),
                "x": clean_train.x[rows],
                "targets": targets,
                "settings": [self.passes, self.fooling_rate, self.deepfool_steps,
                             self.overshoot, self.patience, self.sigma, self.amplitude],
            },
        )  # fmt: skip

    def search(
        self, model: nn.Module, x: Tensor, targets: Tensor, g: torch.Generator
    ) -> tuple[Tensor, float]:
        """The universal perturbation (class docstring) for images x towards `targets`, and
        its fooling rate on x."""

        def labels(images: Tensor) -> Tensor:
            with torch.no_grad():
                return model(images).argmax(1)

        clean_labels = labels(x)
        v = torch.zeros_like(x[0])
        best, best_rate = v, -1.0
        rates: list[float] = []
        for _ in range(self.passes):
            for i in torch.randperm(len(x), generator=g).tolist():
                start = (x[i] + v).clamp(0, 1)
                if int(labels(start[None])[0]) != int(clean_labels[i]):
                    continue  # the trigger already fools this one
                step, used = targeted_deepfool(
                    model, start, int(targets[i]), self.overshoot, self.deepfool_steps
                )
                if used < self.deepfool_steps - 1:  # converged (the authors' test)
                    smooth = gaussian_low_pass(v + gaussian_low_pass(step, self.sigma), self.sigma)
                    v = rescale(smooth, self.amplitude)
            rate = float((labels((x + v).clamp(0, 1)) != clean_labels).float().mean())
            rates.append(rate)
            if rate >= best_rate:
                best, best_rate = v, rate
            recent = rates[-self.patience :]
            if rate >= self.fooling_rate or (
                self.patience and len(recent) == self.patience and max(recent) - min(recent) < 0.01
            ):
                break
        return best, best_rate

    def apply_trigger(self, x: Tensor) -> Tensor:
        if self._trigger is None:
            raise RuntimeError("LowFrequency.fit(clean_train, test, ctx) must run first")
        return (x + self._trigger.to(x)).clamp_(0, 1)
