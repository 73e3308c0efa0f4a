"""Blind backdoor (Bagdasaryan & Shmatikov 2021): the attack poisons the loss computation, not
the data: every training batch adds a backdoor loss on its triggered copy."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from bdrun.attacks.base import Attack
from bdrun.attacks.triggers import place, stamp
from bdrun.data.base import DataInfo
from bdrun.errors import BdrunError
from bdrun.training import Trainee, TrainingHook
from bdrun.validate import at_least, coerce, fraction, one_of

BALANCES = ("mgda", "fixed")
NORMALIZERS = ("loss+", "loss", "l2", "none")
TASKS = ("normal", "backdoor")

# The authors' pattern synthesizer (synthesizers/pattern_synthesizer.py): 1 = white, 0 = black,
# None = the image's own pixel.
_ = None
PATTERN = ((1, 0, 1), (_, 1, _), (_, _, 0), (_, 1, _), (1, 0, 1))


def pattern_and_mask(channels: int) -> tuple[Tensor, Tensor]:
    """The authors' 5 x 3 pattern [C, 5, 3] and its mask [1, 5, 3]."""
    mask = torch.tensor([[v is not None for v in row] for row in PATTERN], dtype=torch.float32)
    values = torch.tensor([[v or 0 for v in row] for row in PATTERN], dtype=torch.float32)
    return values.expand(channels, -1, -1).clone(), mask[None]


def gradients(loss: Tensor, params: list[Tensor]) -> list[Tensor]:
    """d loss / d params, keeping the graph for the training step's own backward pass (zeros
    for parameters the loss does not use)."""
    grads = torch.autograd.grad(loss, params, retain_graph=True, allow_unused=True)
    return [torch.zeros_like(p) if g is None else g for p, g in zip(params, grads, strict=True)]


def gradient_norm_factor(grads: list[Tensor], loss: Tensor, normalize: str) -> Tensor:
    """What a task's gradients are divided by before the min-norm solution (the authors'
    utils/min_norm_solvers.py `gradient_normalizers`): 'l2' their norm, 'loss' the loss
    (at most 10), 'loss+' loss times norm (at most 10), 'none' 1."""
    if normalize == "none":
        return loss.new_tensor(1.0)
    if normalize == "loss":
        return loss.detach().clamp(max=10.0)
    norm = torch.sqrt(sum(g.pow(2).sum() for g in grads))
    if normalize == "l2":
        return norm
    return (loss.detach() * norm).clamp(max=10.0)


def min_norm_weight(v1v1: Tensor, v1v2: Tensor, v2v2: Tensor) -> Tensor:
    """gamma in [0.001, 0.999] that minimises |gamma x1 + (1 - gamma) x2|^2 given <x1, x1>,
    <x1, x2>, <x2, x2> (the authors' `_min_norm_element_from2`, Sener and Koltun's two-task
    MGDA solution, which their Frank-Wolfe solver returns as it stands for two tasks)."""
    inner = (v2v2 - v1v2) / (v1v1 + v2v2 - 2 * v1v2).clamp_min(1e-30)
    gamma = torch.where(v1v2 >= v2v2, torch.full_like(inner, 0.001), inner)
    return torch.where(v1v2 >= v1v1, torch.full_like(inner, 0.999), gamma)


def mgda_scales(
    backdoor_grads: list[Tensor],
    normal_grads: list[Tensor],
    backdoor_loss: Tensor,
    normal_loss: Tensor,
    normalize: str,
) -> tuple[Tensor, Tensor]:
    """(backdoor scale, normal scale), summing to 1: the min-norm point of the convex hull of
    the two tasks' normalised gradients over the shared parameters (MGDA)."""
    b_factor = gradient_norm_factor(backdoor_grads, backdoor_loss, normalize) + 1e-5
    n_factor = gradient_norm_factor(normal_grads, normal_loss, normalize) + 1e-5
    bb = sum(g.pow(2).sum() for g in backdoor_grads) / b_factor**2
    bn = sum((g * h).sum() for g, h in zip(backdoor_grads, normal_grads, strict=True))
    bn = bn / (b_factor * n_factor)
    nn_ = sum(h.pow(2).sum() for h in normal_grads) / n_factor**2
    gamma = min_norm_weight(bb, bn, nn_)
    return gamma, 1 - gamma


class Blind(Attack):
    """Blind code-poisoning backdoor: the training code computes, for every batch, the main
    loss on the batch and a backdoor loss on a copy whose first round(batch * backdoor_share)
    images carry the trigger and the backdoor label, and optimises their weighted sum. No
    training row is poisoned (poison rate 0, an empty poison mask): the attacker controls the
    loss computation only. Backdoor test inputs carry the trigger, as for any attack.

    Bagdasaryan and Shmatikov, "Blind Backdoors in Deep Learning Models", USENIX Security 2021;
    authors' code ebagdasa/backdoors101 (attack.py `compute_blind_loss`,
    losses/loss_functions.py, utils/min_norm_solvers.py, synthesizers/pattern_synthesizer.py).

    Weights: `balance: mgda` solves, per batch, the two-task min-norm problem over the gradients
    of the two losses with respect to the model's parameters (their `loss_balance: MGDA`, with
    their `mgda_normalize`), or `balance: fixed` uses `fixed_scales` (their `fixed`). Defaults:
    MGDA with 'loss+' normalisation (configs/cifar10_params.yaml; mnist_params.yaml uses
    'loss'), backdoor share 1.0 (their `poisoning_proportion` of utils/parameters.py and
    mnist_params.yaml; cifar10 sets 1.1, the whole batch too), their pattern synthesizer's
    5 x 3 black-and-white pattern. BackdoorBench's blind config defaults to fixed scales
    normal 1.0, backdoor 0.9; here MGDA, the paper's method (`attack.balance=fixed`, with
    those weights in `fixed_scales`, gives BackdoorBench's). Their cifar10 config starts the
    backdoor loss only once the mean main loss of the last 1000 batches is below 1.0
    (`loss_threshold`, not set in their MNIST config); that switch is left out.

    The pattern sits at rows 3-7, columns 23-25 in their code (28 x 28 and 32 x 32 images);
    here it is placed like BadNets' patches (`location`, `margin`), top right with margin 2 by
    default (rows 2-6, columns 23-25 on 28 x 28), so it fits any image of at least 7 x 5;
    `attack.location=[3,23]` gives their place. Their target label is 8; bdrun's default 0.

    The scales are computed with torch.autograd.grad inside the loss (two extra backward
    passes per batch, as the authors'); on several GPUs each process solves for its own batch.

    Parameters:
        balance: 'mgda' or 'fixed'.
        mgda_normalize: 'loss+', 'loss', 'l2' or 'none' (MGDA only).
        fixed_scales: {normal: w, backdoor: w} for balance=fixed.
        backdoor_share: share of each batch triggered in the backdoor copy (in (0, 1]).
        location, margin: where the 5 x 3 pattern goes (as BadNets' `place`).
    """

    name = "blind"
    poisons_data = False
    triggers_in_training = True

    def __init__(
        self,
        balance: str,
        mgda_normalize: str,
        fixed_scales: Any,
        backdoor_share: float,
        location: Any,
        margin: int,
        **base,
    ) -> None:
        super().__init__(poison_rate=0.0, **base)
        self.balance = balance
        self.mgda_normalize = mgda_normalize
        self.fixed_scales = fixed_scales
        self.backdoor_share = backdoor_share
        self.location = location
        self.margin = margin

    def setup(self, info: DataInfo, seed: int) -> None:
        super().setup(info, seed)
        self.balance = one_of(self.balance, "balance", BALANCES, group="attack")
        self.mgda_normalize = one_of(
            self.mgda_normalize, "mgda_normalize", NORMALIZERS, group="attack"
        )
        self.scales = self._check_scales()
        share = fraction(self.backdoor_share, "attack.backdoor_share")
        if share == 0:
            raise BdrunError("attack.backdoor_share=0 trains no backdoor; use (0, 1], e.g. 1.0")
        self.backdoor_share = share
        margin = at_least(self.margin, "int", "margin", 0, 2, group="attack")
        channels, height, width = info.shape
        self._pattern, self._mask = pattern_and_mask(channels)
        location = self.location if isinstance(self.location, str) else list(self.location)
        self._top, self._left = place(
            location, tuple(self._mask.shape[1:]), (height, width), margin
        )

    def _check_scales(self) -> dict[str, float]:
        message = (
            f"attack.fixed_scales={self.fixed_scales!r} must give normal and backdoor weights "
            ">= 0, e.g. {normal: 1.0, backdoor: 0.9}"
        )
        try:
            given = dict(self.fixed_scales)
        except (TypeError, ValueError):
            raise BdrunError(message) from None
        if set(given) != set(TASKS):
            raise BdrunError(message)
        scales = {
            task: coerce(given[task], "float", f"attack.fixed_scales.{task}") for task in TASKS
        }
        if any(v < 0 for v in scales.values()) or not any(scales.values()):
            raise BdrunError(message)
        return scales

    def trigger_region(self) -> Tensor:
        _, height, width = self.info.shape  # type: ignore[union-attr]
        region = torch.zeros(1, height, width, dtype=torch.bool)
        rows, cols = self._mask.shape[1:]
        region[0, self._top : self._top + rows, self._left : self._left + cols] = self._mask[0] > 0
        return region

    def apply_trigger(self, x: Tensor) -> Tensor:
        return stamp(x, self._pattern, self._mask, self._top, self._left)

    def backdoor_batch(self, x: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
        """The batch's backdoor copy: its first round(len * backdoor_share) rows triggered and
        given their backdoor label (the authors' `make_backdoor_batch`)."""
        count = round(len(x) * self.backdoor_share)
        x, y = x.clone(), y.clone()
        x[:count] = self.apply_trigger(x[:count])
        y[:count] = self.backdoor_label(y[:count])
        return x, y

    def training_hooks(self) -> list[TrainingHook]:
        return [BlindLossHook(self)]


class BlindLossHook(TrainingHook):
    """The blind loss: scale_normal * CE(batch) + scale_backdoor * CE(backdoor copy)."""

    resumable = True  # nothing is kept from one batch to the next

    def __init__(self, attack: Blind) -> None:
        self.attack = attack
        self._x: Tensor | None = None

    def on_batch(self, x: Tensor, y: Tensor, pos: Tensor, module: Trainee) -> tuple[Tensor, Tensor]:
        self._x = x
        return x, y

    def loss(self, logits: Tensor, y: Tensor, pos: Tensor, module: Trainee) -> Tensor | None:
        assert self._x is not None, "on_batch runs before loss"
        smoothing = module.settings.label_smoothing
        normal = F.cross_entropy(logits, y, label_smoothing=smoothing)
        x_back, y_back = self.attack.backdoor_batch(self._x, y)
        self._x = None
        backdoor = F.cross_entropy(module.model(x_back), y_back, label_smoothing=smoothing)
        if self.attack.balance == "fixed":
            scales = self.attack.scales
            return scales["normal"] * normal + scales["backdoor"] * backdoor
        shared = [p for p in module.model.parameters() if p.requires_grad]
        backdoor_scale, normal_scale = mgda_scales(
            gradients(backdoor, shared),
            gradients(normal, shared),
            backdoor,
            normal,
            self.attack.mgda_normalize,
        )
        return normal_scale * normal + backdoor_scale * backdoor
