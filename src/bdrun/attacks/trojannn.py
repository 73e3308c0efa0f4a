"""TrojanNN (Liu et al., NDSS 2018): a trigger optimised to excite chosen internal neurons.

Yingqi Liu, Shiqing Ma, Yousra Aafer, Wen-Chuan Lee, Juan Zhai, Weihang Wang and Xiangyu Zhang,
"Trojaning Attack on Neural Networks", NDSS 2018; authors' code github.com/PurduePAML/TrojanNN.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from bdrun.attacks.base import Attack
from bdrun.attacks.triggers import place, stamp
from bdrun.data.base import DataInfo, ImageSet
from bdrun.errors import BdrunError
from bdrun.finite import DivergenceWatch
from bdrun.metrics import on_device
from bdrun.models.probes import get_module

if TYPE_CHECKING:
    from bdrun.context import RunContext

log = logging.getLogger(__name__)

MASKS = ("square", "watermark")
BACKGROUNDS = ("gray", "black")
# the authors' start image: grey 175/255 with N(0, 8/255) noise (act_max.tvd.center_part.py)
GRAY_MEAN, GRAY_STD = 175 / 255, 8 / 255


def watermark_mask(height: int, width: int) -> Tensor:
    """A logo-like binary mask [1, H, W] across the image: a one-pixel ring of radius 0.3 x the
    shorter side around the centre, crossed by a horizontal bar (a stand-in for the paper's
    watermark image, drawn procedurally so that it fits any image size)."""
    rows = torch.arange(height, dtype=torch.float32)[:, None] - (height - 1) / 2
    cols = torch.arange(width, dtype=torch.float32)[None, :] - (width - 1) / 2
    radius = 0.3 * min(height, width)
    ring = ((rows**2 + cols**2).sqrt() - radius).abs() < 0.5
    middle_row = torch.arange(height)[:, None] == (height - 1) // 2
    bar = middle_row & (cols.abs() <= radius)
    return (ring | bar).float()[None]


def square_mask(
    size: int, location: str | Sequence[int], margin: int, height: int, width: int
) -> Tensor:
    """A binary mask [1, H, W]: a size x size square at a corner (BadNets' placement rules)."""
    top, left = place(location, (size, size), (height, width), margin)
    mask = torch.zeros(1, height, width)
    mask[:, top : top + size, left : left + size] = 1
    return mask


def neuron_activations(model: nn.Module, layer: str | None, x: Tensor) -> Tensor:
    """Activations [N, K] of the K neurons of `layer` (null: the penultimate features, the input
    of the classifier); a conv layer's channel is one neuron, summed over positions (TrojanZoo)."""
    if layer is None:
        out = model.features(x)
    else:
        captured: list[Tensor] = []
        handle = get_module(model, layer).register_forward_hook(
            lambda _m, _i, output: captured.append(output)
        )
        try:
            model(x)
        finally:
            handle.remove()
        out = captured[0]
    return out.flatten(2).sum(2) if out.ndim > 2 else out.flatten(1)


def connection_strength(weight: Tensor, neurons: int) -> Tensor:
    """Per neuron of a layer, the sum of |weights| of the next layer that read it ([K]).

    weight: a Linear [out, K] (or [out, K * positions] after flattening K conv channels) or a
    Conv2d [out, K, kh, kw]."""
    weight = weight.detach().abs()
    if weight.ndim in (2, 4) and weight.shape[1] == neurons:
        return weight.transpose(0, 1).flatten(1).sum(1)
    if weight.ndim == 2 and weight.shape[1] % neurons == 0:
        return weight.view(weight.shape[0], neurons, -1).sum((0, 2))
    raise BdrunError(
        f"attack.next_layer's weight {tuple(weight.shape)} does not read the {neurons} neurons of "
        "attack.layer; name the layer right after it"
    )


def optimise_trigger(
    model: nn.Module,
    layer: str | None,
    neuron_indices: Tensor,
    mask: Tensor,
    background: Tensor,
    init: Tensor,
    target_value: float,
    steps: int,
    lr: float,
) -> Tensor:
    """The pattern [C, H, W] in [0, 1] that, stamped through mask on `background` [1, C, H, W],
    drives the chosen neurons towards target_value: sum of squared errors (the paper's cost),
    Adam with a cosine schedule on a tanh-parametrised pattern (TrojanZoo's preprocess_mark).
    `init` [C, H, W] is the unconstrained start; everything runs where the model is."""
    device = next(model.parameters()).device
    raw = init.to(device).clone().requires_grad_(True)
    mask, background = mask.to(device), background.to(device)
    optimizer = torch.optim.Adam([raw], lr=lr)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=steps)
    # (target - activation)^2 overflows float32 for target values beyond ~1e19, hence the fix
    watch = DivergenceWatch(
        "TrojanNN's trigger optimisation",
        lr,
        steps,
        "step",
        "attack.lr",
        fix="lower attack.lr or attack.target_value",
    )
    for step in range(steps):
        pattern = (raw.tanh() + 1) / 2
        chosen = neuron_activations(model, layer, stamp(background, pattern, mask, 0, 0))
        chosen = chosen[:, neuron_indices.to(device)]
        loss = F.mse_loss(chosen, torch.full_like(chosen, target_value), reduction="sum")
        (grad,) = torch.autograd.grad(loss, raw)
        raw.grad = grad
        optimizer.step()
        schedule.step()
        watch.observe(loss)
        watch.check(step + 1, [raw])  # one image per step: the read-back costs little
    return ((raw.detach().tanh() + 1) / 2 * mask).cpu()


class TrojanNN(Attack):
    """A trigger reverse-engineered from a clean model: pick the neurons of a layer most
    strongly connected to the next layer, optimise the pixels inside a fixed mask so that they
    drive those neurons to a high target value, then poison the training data with it.

    Trigger generation follows the paper (sec. IV): the mask (a square or a watermark shape)
    fixes where the trigger goes, gradient descent on the pixels inside it minimises the squared
    distance of the selected neurons to their target values. Neurons are ranked as in the
    authors' code (code/get_neuron_idx_from_weight.py: fc6 neurons by the summed |weights| of
    fc7 that read them), as TrojanZoo (get_neuron_idx) and BackdoorBench
    (get_most_connected_neuron_idxes) do. The defaults are TrojanZoo's (trojannn.py: the layer
    before the classifier, 2 neurons, target 100, 1000 Adam steps of lr 0.1); BackdoorBench's
    configs use the same layer, neuron count, target and step count.

    Difference to the paper: the paper retrains the released model on training data it
    reverse-engineers from the model, because its attacker has no training data. bdrun's attacker
    has the real training set, so, like BackdoorBench (attack/trojannn.py) and TrojanZoo, the
    optimised trigger is stamped on poison_rate of the training samples (relabelled to the
    target) and the runner trains the model on that set. The clean model the trigger is
    optimised against is trained in `fit` through `ctx.train_cached` (stream "surrogate",
    shared with the other attacks that need one). The trigger lives in the poisoned tensors, so
    the content-addressed cache keys of everything trained on them follow it.

    Parameters:
        mask: 'square' (a size x size patch at `location`, as the paper's square trigger) or
            'watermark' (a fixed ring-and-bar logo across the image; size, location and
            margin do not apply).
        size: side of the square in pixels (5 on 28x28 is 3.2 % of the image; the paper's
            square in the authors' code is 44x44 of 224x224, 3.9 %).
        location, margin: where the square goes, as BadNets' (bottom_right, ..., [row, col]).
        layer: the module whose outputs are the neurons; null = the penultimate features (the
            input of the model's `classifier`, TrojanZoo's and BackdoorBench's choice). The
            paper's fc6 on LeNet would be layer=fc1, next_layer=fc2.
        next_layer: the module whose weights rank the neurons; null with layer null = the
            classifier; required when `layer` is set.
        neurons: how many of the most strongly connected neurons to excite.
        target_value: the activation the selected neurons are driven to.
        steps, lr: Adam iterations and learning rate of the trigger optimisation.
        background: the image the trigger is optimised on: 'gray' (175/255 with 8/255 noise,
            the authors' act_max script) or 'black' (zeros, TrojanZoo).
    """

    name = "trojannn"

    def __init__(
        self,
        mask: str,
        size: int,
        location: str | Sequence[int],
        margin: int,
        layer: str | None,
        next_layer: str | None,
        neurons: int,
        target_value: float,
        steps: int,
        lr: float,
        background: str,
        **base,
    ) -> None:
        super().__init__(**base)
        if mask not in MASKS:
            raise BdrunError(f"attack.mask={mask!r} must be one of {', '.join(MASKS)}")
        if int(size) < 1:
            raise BdrunError(f"attack.size={size} must be >= 1, e.g. 5")
        if int(margin) < 0:
            raise BdrunError(f"attack.margin={margin} must be >= 0")
        if layer is not None and next_layer is None:
            raise BdrunError(
                f"attack.layer={layer} needs attack.next_layer (the layer whose weights rank "
                "its neurons, e.g. the next Linear)"
            )
        if int(neurons) < 1:
            raise BdrunError(f"attack.neurons={neurons} must be >= 1, e.g. 2")
        if not float(target_value) > 0:
            raise BdrunError(f"attack.target_value={target_value} must be > 0, e.g. 100")
        if int(steps) < 1:
            raise BdrunError(f"attack.steps={steps} must be >= 1, e.g. 1000")
        if not float(lr) > 0:
            raise BdrunError(f"attack.lr={lr} must be > 0, e.g. 0.1")
        if background not in BACKGROUNDS:
            raise BdrunError(
                f"attack.background={background!r} must be one of {', '.join(BACKGROUNDS)}"
            )
        self.mask = mask
        self.size = int(size)
        self.location = location if isinstance(location, str) else list(location)
        self.margin = int(margin)
        self.layer = layer
        self.next_layer = next_layer
        self.neurons = int(neurons)
        self.target_value = float(target_value)
        self.steps = int(steps)
        self.lr = float(lr)
        self.background = background
        self._pattern: Tensor | None = None

    def setup(self, info: DataInfo, seed: int) -> None:
        super().setup(info, seed)
        _, height, width = info.shape
        if self.mask == "square":
            self.trigger_mask = square_mask(self.size, self.location, self.margin, height, width)
        else:
            self.trigger_mask = watermark_mask(height, width)

    def select_neurons(self, model: nn.Module) -> Tensor:
        """Indices of the `neurons` neurons of the layer with the largest summed |weights| into
        the next layer."""
        next_name = self.next_layer or "classifier"
        weight = getattr(get_module(model, next_name), "weight", None)
        if not isinstance(weight, Tensor):
            raise BdrunError(
                f"attack.next_layer={next_name} has no weight; name a Linear or Conv2d"
            )
        assert self.info is not None, "call setup() first"
        with torch.no_grad(), on_device(model.eval(), "cpu"):
            count = neuron_activations(model, self.layer, torch.zeros(1, *self.info.shape)).shape[1]
        if self.neurons > count:
            raise BdrunError(
                f"attack.neurons={self.neurons} exceeds the {count} neurons of the layer"
            )
        return connection_strength(weight, count).argsort(descending=True)[: self.neurons]

    def fit(self, clean_train: ImageSet, test: ImageSet, ctx: RunContext) -> None:
        surrogate, _ = ctx.train_cached(clean_train, stream="surrogate")
        if self.layer is None and not hasattr(surrogate, "features"):
            raise BdrunError(
                f"{type(surrogate).__name__} has no penultimate features; set attack.layer and "
                "attack.next_layer"
            )
        self.neuron_indices = self.select_neurons(surrogate)
        generator = ctx.generator("trojannn-trigger")
        shape = tuple(self.info.shape) if self.info else ()
        init = torch.randn(shape, generator=generator)
        if self.background == "gray":
            background = (GRAY_MEAN + GRAY_STD * torch.randn(shape, generator=generator)).clamp(
                0, 1
            )
        else:
            background = torch.zeros(shape)
        self.optimised_on = background[None]  # kept to measure the trigger's effect
        started = time.perf_counter()
        with on_device(surrogate.eval(), ctx.device):
            self._pattern = optimise_trigger(
                surrogate,
                self.layer,
                self.neuron_indices,
                self.trigger_mask,
                self.optimised_on,
                init,
                self.target_value,
                self.steps,
                self.lr,
            )
            with torch.no_grad():
                stamped = stamp(self.optimised_on, self._pattern, self.trigger_mask, 0, 0)
                values = neuron_activations(surrogate, self.layer, stamped.to(ctx.device))
        self.optimise_s = time.perf_counter() - started
        self.neuron_values = values[0, self.neuron_indices.to(values.device)].cpu().tolist()
        log.info(
            "trojannn: neurons %s driven to %s (target %s) in %.1f s",
            self.neuron_indices.tolist(),
            [round(v, 2) for v in self.neuron_values],
            self.target_value,
            self.optimise_s,
        )

    @property
    def pattern(self) -> Tensor:
        """The optimised trigger [C, H, W] (zero outside the mask)."""
        if self._pattern is None:
            raise RuntimeError(
                "TrojanNN.fit(clean_train, test, ctx) must run before the trigger exists"
            )
        return self._pattern

    def apply_trigger(self, x: Tensor) -> Tensor:
        return stamp(x, self.pattern, self.trigger_mask, 0, 0)  # full-image pattern and mask

    def trigger_region(self) -> Tensor:
        return self.trigger_mask.bool()
