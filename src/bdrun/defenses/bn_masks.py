"""Masks on BatchNorm channels, shared by the mask-learning pruning defenses (ANP, RNP).

Both defenses learn one value in [0, 1] per BatchNorm channel (a "neuron": the authors' code
calls it neuron_mask) that multiplies the layer's weight (gamma) while its bias (beta) stays,
and prune the channels whose mask is low by setting their gamma to 0, as both authors' pruning
scripts do (ANP_backdoor prune_neuron_cifar.py and RNP main.py `pruning`): such a channel then
outputs its constant beta, which carries nothing of the input. The channels of every affine
BatchNorm layer of the model are handled as one flat vector (`BnChannels`), so a mask update is
one tensor operation for the whole network; a masked forward pass substitutes the scaled gamma
and beta with torch.func.functional_call, leaving the module untouched.

Which channels to prune is decided on the clean holdout only (`BnMaskPruning.plan`): either the
authors' fixed threshold, or the largest threshold of the authors' grid whose holdout accuracy
stays within `acc_drop` of the unpruned model's. The CCA / ASR / RA curve over the grid is scored
on the test sets for figures only, after the decision is taken.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call

from bdrun.data.base import to_float
from bdrun.defenses.base import NOTHING_CARRIED, Carried, Defense, require_holdout
from bdrun.defenses.nad import augment
from bdrun.defenses.pruning import copy_model, make_permanent
from bdrun.errors import BdrunError
from bdrun.metrics import accuracy, predict
from bdrun.report.pruning_curve import write_csv, write_pruning_curve
from bdrun.validate import coerce, fraction

if TYPE_CHECKING:
    from bdrun.context import RunContext
    from bdrun.data.base import ImageSet
    from bdrun.state import RunData

log = logging.getLogger(__name__)

SELECTIONS = ("holdout", "threshold")
MIN_HOLDOUT = 20  # BatchNorm's batch statistics and the accuracy that decides need a few dozen
CURVE_COLUMNS = ("threshold", "pruned", "fraction", "holdout_acc", "cca", "asr", "ra")


@dataclass(frozen=True)
class BnChannels:
    """The affine BatchNorm layers of a model, their channels numbered as one flat vector in
    module order (layer by layer)."""

    names: tuple[str, ...]
    sizes: tuple[int, ...]

    @property
    def total(self) -> int:
        return sum(self.sizes)

    def split(self, flat: Tensor) -> tuple[Tensor, ...]:
        """One slice of a flat [total] tensor per layer."""
        return torch.split(flat, list(self.sizes))

    def per_layer(self, flags: Tensor) -> dict[str, int]:
        """How many of the flagged channels each layer holds."""
        return {
            name: int(part.sum()) for name, part in zip(self.names, self.split(flags), strict=True)
        }

    def labels(self) -> Iterator[tuple[str, int]]:
        """(layer, channel) of every flat index, in order."""
        for name, size in zip(self.names, self.sizes, strict=True):
            for channel in range(size):
                yield name, channel


def bn_channels(model: nn.Module, who: str) -> BnChannels:
    """The model's affine BatchNorm layers, or a one-line user error when it has none."""
    found = [
        (name, module.num_features)
        for name, module in model.named_modules()
        if isinstance(module, nn.modules.batchnorm._BatchNorm) and module.affine
    ]
    if not found:
        raise BdrunError(
            f"defense={who} learns masks on BatchNorm channels, but model "
            f"{type(model).__name__} has no BatchNorm layer; use model=small_cnn_bn (or another "
            "model with BatchNorm)"
        )
    names, sizes = zip(*found, strict=True)
    return BnChannels(tuple(names), tuple(sizes))


def scaled_forward(
    model: nn.Module,
    channels: BnChannels,
    x: Tensor,
    weight_scale: Tensor,
    bias_scale: Tensor | None = None,
) -> Tensor:
    """model(x) with every BatchNorm layer's weight multiplied by its part of `weight_scale`
    [total] and its bias by its part of `bias_scale` (unchanged when None); differentiable in
    both. The module's own parameters are not modified (its running statistics are updated in
    training mode, as a plain forward pass would)."""
    modules = dict(model.named_modules())
    overrides: dict[str, Tensor] = {}
    weights = channels.split(weight_scale)
    biases = channels.split(bias_scale) if bias_scale is not None else [None] * len(weights)
    for name, w_scale, b_scale in zip(channels.names, weights, biases, strict=True):
        norm = modules[name]
        overrides[f"{name}.weight"] = norm.weight * w_scale
        if b_scale is not None:
            overrides[f"{name}.bias"] = norm.bias * b_scale
    return functional_call(model, overrides, (x,))


def working_copy(model: nn.Module) -> nn.Module:
    """A plain copy of `model` (earlier pruning masks folded in) whose own parameters are frozen:
    the mask-learning defenses train masks on it, not its weights."""
    work = make_permanent(copy_model(model))
    work.requires_grad_(False)
    return work


@torch.no_grad()
def prune_channels(model: nn.Module, channels: BnChannels, pruned: Tensor) -> nn.Module:
    """A copy of `model` with the gamma of every `pruned` channel (bool [total]) set to 0, the
    authors' pruning; the given model is left as it was."""
    out = make_permanent(copy_model(model)).eval()
    modules = dict(out.named_modules())
    for name, flags in zip(channels.names, channels.split(pruned.bool().cpu()), strict=True):
        weight = modules[name].weight
        weight[flags.to(weight.device)] = 0.0
    return out


def threshold_grid(
    pruning_max: float, pruning_step: float, extra: Sequence[float] = ()
) -> list[float]:
    """The authors' thresholds 0, step, 2 step, ... up to pruning_max (np.arange(0, max + step,
    step) in prune_neuron_cifar.py / RNP main.py), plus `extra`, sorted."""
    count = int(pruning_max / pruning_step + 1e-9)
    grid = {round(i * pruning_step, 6) for i in range(count + 1)}
    return sorted(grid | {round(t, 6) for t in extra})


def pruned_at(masks: Tensor, threshold: float) -> Tensor:
    """Bool [total]: the channels whose mask is at most `threshold` (the authors' `<=`)."""
    return masks.double() <= threshold + 1e-9


def mask_step(mask: Tensor, optimizer: torch.optim.Optimizer, loss: Tensor) -> None:
    """One optimiser step on the mask, then the authors' clip to [0, 1]."""
    loss.backward()
    optimizer.step()
    with torch.no_grad():
        mask.clamp_(0.0, 1.0)


def largest_within(
    thresholds: Sequence[float], holdout_acc: Sequence[float], unpruned: float, acc_drop: float
) -> float | None:
    """The largest threshold whose pruned model's holdout accuracy is at most `acc_drop` below
    the unpruned model's, or None (prune nothing) when there is none."""
    floor = unpruned - acc_drop - 1e-9  # tolerance: 0.9 - 0.04 is not 0.86 in binary
    within = [t for t, acc in zip(thresholds, holdout_acc, strict=True) if acc >= floor]
    return max(within) if within else None


@dataclass
class PrunePlan:
    """What the holdout decided: thresholds tried, holdout accuracy at each, the choice."""

    masks: Tensor  # [total] learned mask values
    thresholds: list[float]
    holdout_unpruned: float
    holdout_acc: list[float]  # one per threshold
    chosen: float | None  # the threshold applied; None: nothing pruned

    @property
    def pruned(self) -> Tensor:
        if self.chosen is None:
            return torch.zeros(len(self.masks), dtype=torch.bool)
        return pruned_at(self.masks, self.chosen)


class BnMaskPruning(Defense):
    """Base of the defenses that learn a mask per BatchNorm channel on the clean holdout and
    prune the original model's channels whose mask is low (repair).

    Subclasses implement `learn_masks`. Shared parameters:
        selection: `holdout` (default): the largest threshold of the grid (0, pruning_step, ...,
            pruning_max, plus `threshold`) at which the pruned model's holdout accuracy is within
            `acc_drop` of the unpruned model's (nothing pruned when none is); `threshold`: the
            authors' fixed threshold. Neither looks at a test set (BackdoorBench's anp.py / rnp.py keep
            the pruned model with the lowest *test* ASR: an oracle a defender does not have).
        threshold: prune channels whose mask is <= this in `threshold` mode (ANP: 0.2).
        acc_drop: the holdout-accuracy bound of `holdout` mode; 0.04, the bound of bdrun's
            other pruning defenses (prune, fine_pruning: the middle of CSAW-HackML's 2 / 4 / 10 %
            stops), so that their clean-accuracy costs compare.
        pruning_max, pruning_step: the authors' threshold grid (0.90, 0.05).
        clean_samples: images of the holdout the masks are learned on (drawn with the run's
            generator; the whole holdout when it has fewer). The authors use 500 (1 % of
            CIFAR-10's training set). The threshold is chosen on the whole holdout.
        batch_size, crop_padding, flip: the mask-learning batches and the authors' training
            transforms (RandomCrop(32, padding=4) and RandomHorizontalFlip on CIFAR-10;
            bdrun.defenses.nad.augment), 0 / false turns them off.
        curve: score CCA / ASR / RA on the test sets at every grid threshold (scoring only,
            never a decision) and write pruning_curve_<name>.csv / .png.
    Figures (metrics.detection): the channels, how many were pruned (per layer too), the
    threshold, the holdout accuracies; the mask values go to bn_masks_<name>.csv.
    """

    def __init__(
        self,
        selection: str,
        threshold: float,
        acc_drop: float,
        pruning_max: float,
        pruning_step: float,
        clean_samples: int | None,
        batch_size: int,
        crop_padding: int,
        flip: bool,
        curve: bool,
    ) -> None:
        if selection not in SELECTIONS:
            raise BdrunError(
                f"defense.selection={selection!r} must be one of {', '.join(SELECTIONS)}"
            )
        self.selection = selection
        self.threshold = fraction(threshold, "defense.threshold")
        self.acc_drop = fraction(acc_drop, "defense.acc_drop")
        self.pruning_max = fraction(pruning_max, "defense.pruning_max")
        self.pruning_step = fraction(pruning_step, "defense.pruning_step")
        if self.pruning_step == 0:
            raise BdrunError("defense.pruning_step=0 gives no thresholds; use e.g. 0.05")
        self.clean_samples = (
            None if clean_samples is None else coerce(clean_samples, "int", "defense.clean_samples")
        )
        if self.clean_samples is not None and self.clean_samples < MIN_HOLDOUT:
            raise BdrunError(
                f"defense.clean_samples={self.clean_samples} must be >= {MIN_HOLDOUT} (the "
                "authors use 500), or null for the whole holdout"
            )
        self.batch_size = coerce(batch_size, "int", "defense.batch_size")
        if self.batch_size < 2:  # BatchNorm in training mode needs two values per channel
            raise BdrunError(f"defense.batch_size={self.batch_size} must be >= 2, e.g. 128")
        self.crop_padding = coerce(crop_padding, "int", "defense.crop_padding")
        if self.crop_padding < 0:
            raise BdrunError(f"defense.crop_padding={self.crop_padding} must be >= 0 (0: off)")
        self.flip = bool(flip)
        self.curve = bool(curve)

    # -- what subclasses provide ---------------------------------------------------------------
    def learn_masks(
        self, model: nn.Module, channels: BnChannels, clean: ImageSet, ctx: RunContext
    ) -> Tensor:
        """The mask value of every channel, [total] in [0, 1], learned on `clean`."""
        raise NotImplementedError

    # -- shared steps ----------------------------------------------------------------------------
    def batches(
        self,
        clean: ImageSet,
        g: torch.Generator,
        device: torch.device,
        steps: int | None = None,
        epochs: int = 1,
    ) -> Iterator[tuple[Tensor, Tensor]]:
        """Batches of the clean set on `device`, with the authors' random crop and flip:
        `steps` batches drawn with replacement (ANP's RandomSampler(replacement=True)), or else
        `epochs` shuffled passes with a last partial batch (RNP's DataLoader(shuffle=True))."""
        n = len(clean)
        if steps is not None:
            indices = list(torch.randint(n, (steps, self.batch_size), generator=g))
        else:
            indices = [
                part
                for _ in range(epochs)
                for part in torch.randperm(n, generator=g).split(self.batch_size)
            ]
        for index in indices:
            x = to_float(clean.x[index])
            if self.crop_padding or self.flip:
                x = augment(x, self.crop_padding, self.flip, 0, g)
            yield x.to(device), clean.y[index].to(device)

    @staticmethod
    def loss(logits: Tensor, y: Tensor) -> Tensor:
        return F.cross_entropy(logits, y.to(logits.device))

    def clean_set(self, holdout: ImageSet, ctx: RunContext) -> ImageSet:
        require_holdout(holdout, MIN_HOLDOUT, f"defense={self.name}")
        return holdout.random_subset(self.clean_samples, ctx.generator(f"{self.name}-clean"))

    def plan(
        self, model: nn.Module, channels: BnChannels, masks: Tensor, data: RunData, ctx: RunContext
    ) -> PrunePlan:
        """Holdout accuracy at every grid threshold and the threshold the selection picks."""
        holdout = data.holdout
        batch, device = ctx.settings.eval_batch_size, ctx.device
        grid = threshold_grid(self.pruning_max, self.pruning_step, [self.threshold])

        measured: dict[bytes, float] = {}  # thresholds that prune the same channels: one pass

        def holdout_acc(pruned: Tensor) -> float:
            key = pruned.numpy().tobytes()
            if key not in measured:
                pruned_model = prune_channels(model, channels, pruned)
                measured[key] = accuracy(predict(pruned_model, holdout.x, batch, device), holdout.y)
            return measured[key]

        unpruned = accuracy(predict(model, holdout.x, batch, device), holdout.y)
        accs = [holdout_acc(pruned_at(masks, t)) for t in grid]
        if self.selection == "threshold":
            chosen: float | None = round(self.threshold, 6)  # its grid entry
        else:
            chosen = largest_within(grid, accs, unpruned, self.acc_drop)
        return PrunePlan(masks, grid, unpruned, accs, chosen)

    def score_curve(
        self, model: nn.Module, channels: BnChannels, plan: PrunePlan, ctx: RunContext
    ) -> list[dict[str, Any]]:
        """CCA, ASR and RA at every grid threshold (scoring only, after the decision)."""
        total = channels.total
        rows = [
            {
                "threshold": None,
                "pruned": 0,
                "fraction": 0.0,
                "holdout_acc": plan.holdout_unpruned,
                **self.scores(ctx.evaluate(model)),
            }
        ]
        scored: dict[bytes, dict[str, Any]] = {}  # the same pruned channels: scored once
        for threshold, acc in zip(plan.thresholds, plan.holdout_acc, strict=True):
            pruned = pruned_at(plan.masks, threshold)
            key = pruned.numpy().tobytes()
            if key not in scored:
                scored[key] = self.scores(ctx.evaluate(prune_channels(model, channels, pruned)))
            count = int(pruned.sum())
            rows.append(
                {
                    "threshold": threshold,
                    "pruned": count,
                    "fraction": count / total,
                    "holdout_acc": acc,
                    **scored[key],
                }
            )
        return rows

    @staticmethod
    def scores(figures: dict[str, Any]) -> dict[str, Any]:
        return {key: figures[key] for key in ("cca", "asr", "ra")}

    def report(
        self, model: nn.Module, channels: BnChannels, plan: PrunePlan, ctx: RunContext
    ) -> None:
        pruned = plan.pruned
        count = int(pruned.sum())
        chosen_acc = (
            plan.holdout_unpruned
            if plan.chosen is None
            else plan.holdout_acc[plan.thresholds.index(plan.chosen)]
        )
        ctx.record(
            selection=self.selection,
            bn_layers=list(channels.names),
            channels=channels.total,
            pruned_channels=count,
            pruned_fraction=count / channels.total,
            pruned_per_layer=channels.per_layer(pruned),
            prune_threshold=plan.chosen,
            holdout_acc_unpruned=plan.holdout_unpruned,
            holdout_acc_pruned=chosen_acc,
            mask_mean=float(plan.masks.mean()),
            masks_at_zero=int((plan.masks == 0).sum()),
        )
        rows = [
            {"layer": layer, "channel": channel, "mask": float(value), "pruned": bool(flag)}
            for (layer, channel), value, flag in zip(
                channels.labels(), plan.masks, pruned, strict=True
            )
        ]
        write_csv(
            ctx.run_dir / f"bn_masks_{self.name}.csv", ("layer", "channel", "mask", "pruned"), rows
        )
        if not self.curve:
            return
        rows = self.score_curve(model, channels, plan, ctx)
        chosen_row = next(
            r
            for r in rows
            if r["threshold"] == plan.chosen or (plan.chosen is None and r["threshold"] is None)
        )
        stops = [{"label": "chosen", "fraction": chosen_row["fraction"]}]
        write_pruning_curve(
            ctx.run_dir,
            f"pruning_curve_{self.name}",
            rows,
            ctx.logger,
            title=f"{self.name}: BatchNorm channels pruned by mask threshold",
            columns=CURVE_COLUMNS,
            stops=stops,
        )

    def repair(
        self, model: nn.Module, data: RunData, ctx: RunContext, carried: Carried = NOTHING_CARRIED
    ) -> nn.Module:
        channels = bn_channels(model, self.name)
        clean = self.clean_set(data.holdout, ctx)
        masks = self.learn_masks(model, channels, clean, ctx).detach().cpu()
        ctx.record(clean_samples_used=len(clean))
        plan = self.plan(model, channels, masks, data, ctx)
        log.info(
            "%s: threshold %s prunes %d of %d channels",
            self.name,
            plan.chosen,
            int(plan.pruned.sum()),
            channels.total,
        )
        self.report(model, channels, plan, ctx)
        return prune_channels(model, channels, plan.pruned)
