"""Label-consistent backdoor (Turner et al. 2019): hard-to-classify target images plus a trigger."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from bdrun.attacks.base import Attack
from bdrun.data.base import DataInfo, ImageSet
from bdrun.errors import BdrunError
from bdrun.models.probes import project_perturbation

if TYPE_CHECKING:
    from bdrun.context import RunContext

NORMS = ("l2", "linf")
TRIGGERS = ("bottom_right", "all_corners")

# Turner et al.'s 3x3 corner trigger as signs: +1 = white, -1 = black (label-consistent code,
# poison_attack.py); the left corners use the mirror image of the right ones.
RIGHT_CORNER = torch.tensor([[-1, -1, 1], [-1, 1, -1], [1, -1, 1]], dtype=torch.float32)
LEFT_CORNER = RIGHT_CORNER.flip(1)


def corner_trigger(kind: str, height: int, width: int) -> Tensor:
    """Signed trigger map [1, H, W]: +1 / -1 on the trigger pixels, 0 elsewhere."""
    if kind not in TRIGGERS:
        raise BdrunError(f"attack.trigger={kind!r} must be one of {', '.join(TRIGGERS)}")
    if height < 3 or width < 3:
        raise BdrunError(f"the 3x3 label-consistent trigger does not fit {height}x{width} images")
    signs = torch.zeros(1, height, width)
    signs[0, -3:, -3:] = RIGHT_CORNER
    if kind == "all_corners":
        signs[0, :3, -3:] = RIGHT_CORNER
        signs[0, :3, :3] = LEFT_CORNER
        signs[0, -3:, :3] = LEFT_CORNER
    return signs


def pgd(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    eps: float,
    steps: int,
    step_size: float,
    norm: str,
    batch_size: int = 512,
) -> Tensor:
    """Untargeted PGD (Madry et al. 2018): raise the loss of the true labels y within an l2 or
    l-infinity ball of radius eps around x (pixels in [0, 1]), batched, no random start."""
    model.eval()
    device = next(model.parameters()).device
    out = []
    for start in range(0, len(x), batch_size):
        clean = x[start : start + batch_size].to(device)
        labels = y[start : start + batch_size].to(device)
        delta = torch.zeros_like(clean)
        for _ in range(steps):
            delta.requires_grad_(True)
            loss = F.cross_entropy(model(clean + delta), labels)
            (grad,) = torch.autograd.grad(loss, delta)
            with torch.no_grad():
                if norm == "linf":
                    delta = delta + step_size * grad.sign()
                else:
                    grad_norm = grad.flatten(1).norm(dim=1).clamp_min(1e-12).view(-1, 1, 1, 1)
                    delta = delta + step_size * grad / grad_norm
                delta = project_perturbation(delta, norm, eps)
                delta = (clean + delta).clamp_(0, 1) - clean
        out.append((clean + delta).detach().cpu())
    return torch.cat(out) if out else x.clone()


class CleanLabel(Attack):
    """Turner, Tsipras and Madry's label-consistent backdoor attack (adversarial-perturbation
    variant): target-class training images are pushed away from their own class by PGD against
    a surrogate model, then stamped with the trigger; labels stay correct.

    The surrogate is a model of the configured architecture trained on the clean training set
    (`ctx.train_cached`, stream "surrogate"), so it is cached and shared with other attacks that
    need a clean model. Defaults follow the authors' repository (config.json: l2 perturbations
    of norm 300 in 0-255 pixel units, the 'bottom-right' trigger at full amplitude, target 0).

    Parameters:
        norm: 'l2' or 'linf' ball for the perturbation.
        eps: its radius in 0-255 pixel units (Turner et al. use l2 300 / 600 and linf 8 / 16).
        steps: PGD iterations; the step size is 2.5 * eps / steps (the robustness library's rule).
        trigger: 'bottom_right' or 'all_corners' (the authors' two 3x3 patterns).
        amplitude: null = full amplitude (pixels set to black / white); a number in (0, 1] adds
            +/- amplitude instead (the paper's reduced-amplitude trigger, e.g. 16/255).
    """

    name = "clean_label"
    clean_label = True

    def __init__(
        self,
        norm: str,
        eps: float,
        steps: int,
        trigger: str,
        amplitude: float | None,
        poison_rate: float,
        **base,
    ) -> None:
        # clean-label: the poisons keep their (target) label, so the attack is all-to-one
        super().__init__(poison_rate=poison_rate, label_mode="all2one", **base)
        self.norm = norm
        self.eps = float(eps)
        self.steps = int(steps)
        self.trigger = trigger
        self.amplitude = None if amplitude is None else float(amplitude)
        self._surrogate: nn.Module | None = None

    def setup(self, info: DataInfo, seed: int) -> None:
        super().setup(info, seed)
        if self.norm not in NORMS:
            raise BdrunError(f"attack.norm={self.norm!r} must be one of {', '.join(NORMS)}")
        if self.eps < 0 or self.steps < 0:
            raise BdrunError(f"attack.eps={self.eps} and attack.steps={self.steps} must be >= 0")
        if self.amplitude is not None and not 0 < self.amplitude <= 1:
            raise BdrunError(f"attack.amplitude={self.amplitude} must be in (0, 1] or null")
        _, height, width = info.shape
        self._signs = corner_trigger(self.trigger, height, width)

    def fit(self, clean_train: ImageSet, test: ImageSet, ctx: RunContext) -> None:
        self._surrogate, _ = ctx.train_cached(clean_train, stream="surrogate")
        self._device = ctx.device
        self._batch_size = ctx.settings.eval_batch_size

    def apply_trigger(self, x: Tensor) -> Tensor:
        signs = self._signs.to(x)
        if self.amplitude is None:
            return torch.where(signs != 0, (signs + 1) / 2, x)
        return (x + self.amplitude * signs).clamp_(0, 1)

    def poison_images(self, x: Tensor, y: Tensor) -> Tensor:
        if self._surrogate is None:
            raise RuntimeError("CleanLabel.fit(clean_train, test, ctx) must run before poisoning")
        eps = self.eps / 255
        surrogate = self._surrogate.to(self._device)
        try:
            hard = pgd(
                surrogate,
                x,
                y,
                eps,
                self.steps,
                2.5 * eps / max(self.steps, 1),
                self.norm,
                self._batch_size,
            )
        finally:
            surrogate.to("cpu")
        return self.apply_trigger(hard)
