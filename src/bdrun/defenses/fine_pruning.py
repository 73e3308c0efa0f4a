"""Fine-Pruning (Liu et al. 2018): prune dormant channels, then fine-tune on clean data."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from bdrun.defenses.base import NOTHING_CARRIED, Carried
from bdrun.defenses.finetune import finetune
from bdrun.defenses.prune import Prune
from bdrun.defenses.pruning import (
    channel_activity,
    copy_model,
    make_permanent,
    mask_channels,
    pruning_order,
    resolve_site,
)
from bdrun.errors import BdrunError
from bdrun.metrics import accuracy, predict
from bdrun.report.pruning_curve import write_pruning_curve
from bdrun.validate import check_schedule, coerce, fraction

if TYPE_CHECKING:
    from bdrun.context import RunContext
    from bdrun.data.base import ImageSet
    from bdrun.state import RunData

log = logging.getLogger(__name__)

MODES = ("one_shot", "iterative")
ROUND_COLUMNS = ("round", "pruned", "fraction", "val_acc", "accepted", "cca", "asr", "ra")


class FinePruning(Prune):
    """Prune the last conv layer's dormant channels, then fine-tune on the clean holdout.

    Liu, Dolan-Gavitt & Garg, "Fine-Pruning" (RAID 2018), Sec. 3.3. Two forms:

    - `one_shot` (the paper): rank once on the holdout, prune to `prune_ratio` or until the
      holdout accuracy would drop by more than `acc_drop` (Prune's stop and pruning curve), then
      fine-tune `epochs` epochs with learning rate `lr`. Pruned channels stay zero while
      fine-tuning (torch pruning masks).
    - `iterative` (a common variant): repeatedly prune `step` of the remaining channels (at
      least one), re-ranked on the current model, and fine-tune `epochs` epochs; stop when the
      accuracy on a validation slice of the holdout falls below `acc_cutoff` (absolute), or
      below the unpruned model's minus `acc_drop` when `acc_cutoff` is null, and keep the last
      model above it; `prune_ratio`, when set, caps the fraction pruned. The slice
      (`val_fraction` of the holdout) is never fine-tuned on, so the accuracy that decides is
      not inflated by training on it. The stop uses clean accuracy only: the defender does not
      know the trigger, so no ASR (not even on a proxy) can drive it. ASR, CCA and RA of every
      round are still scored on the test sets for the rounds table and plot.

    Parameters beyond Prune's:
        lr, epochs: fine-tuning schedule (per round when iterative); lr 0.01 as BackdoorBench's
            fine-pruning config, other settings from the run's `train` node.
        mode: one_shot | iterative.
        step: fraction of the remaining channels pruned per round (iterative).
        acc_cutoff: absolute validation-accuracy floor (iterative); null = unpruned - acc_drop.
        val_fraction: share of the holdout kept aside to decide (iterative).
        max_rounds: a safety cap on rounds (iterative).
    """

    def __init__(
        self,
        lr: float,
        epochs: int,
        mode: str,
        step: float,
        acc_cutoff: float | None,
        val_fraction: float,
        max_rounds: int,
        **prune_settings: Any,
    ) -> None:
        super().__init__(**prune_settings)
        self.lr, self.epochs = check_schedule(lr, epochs)
        if mode not in MODES:
            raise BdrunError(f"defense.mode={mode!r} must be one of {', '.join(MODES)}")
        self.mode = mode
        self.step = fraction(step, "defense.step")
        if self.step == 0:
            raise BdrunError("defense.step=0 prunes nothing; use a fraction in (0, 1]")
        self.acc_cutoff = fraction(acc_cutoff, "defense.acc_cutoff", allow_none=True)
        self.val_fraction = fraction(val_fraction, "defense.val_fraction")
        self.max_rounds = coerce(max_rounds, "int", "defense.max_rounds")

    def repair(
        self, model: nn.Module, data: RunData, ctx: RunContext, carried: Carried = NOTHING_CARRIED
    ) -> nn.Module:
        if self.mode == "iterative":
            return self.iterate(model, data.holdout, ctx)
        pruned = self.pruned_copy(model, data, ctx)
        tuned = finetune(pruned, data.holdout, ctx, self.lr, self.epochs, stream="fine-pruning")
        ctx.record(holdout_acc_finetuned=self.accuracy(tuned, data.holdout, ctx))
        return make_permanent(tuned)

    # -- iterative ------------------------------------------------------------------------------
    @staticmethod
    def accuracy(model: nn.Module, data: ImageSet, ctx: RunContext) -> float:
        return accuracy(predict(model, data.x, ctx.settings.eval_batch_size, ctx.device), data.y)

    def split_holdout(self, holdout: ImageSet, ctx: RunContext) -> tuple[ImageSet, ImageSet]:
        """(fine-tuning part, validation part) of the holdout, drawn with a seeded stream."""
        n_val = round(self.val_fraction * len(holdout))
        if n_val < 1 or n_val >= len(holdout):
            raise BdrunError(
                f"defense.val_fraction={self.val_fraction} leaves no validation or no fine-tuning "
                f"data in a holdout of {len(holdout)}; use a fraction strictly between them"
            )
        perm = torch.randperm(len(holdout), generator=ctx.generator("fine-pruning-split"))
        return holdout.subset(perm[n_val:].sort().values), holdout.subset(
            perm[:n_val].sort().values
        )

    def round_row(
        self, ctx: RunContext, model: nn.Module, index: int, pruned: int, channels: int, val: float
    ) -> dict[str, Any]:
        row: dict[str, Any] = {
            "round": index,
            "pruned": pruned,
            "fraction": pruned / channels,
            "val_acc": val,
        }
        if self.curve:  # scoring only, never a decision
            row.update(ctx.evaluate(model))
        return row

    def iterate(self, model: nn.Module, holdout: ImageSet, ctx: RunContext) -> nn.Module:
        tune, val = self.split_holdout(holdout, ctx)
        site = resolve_site(model, self.prune_layer, self.rank_layer)
        batch, device = ctx.settings.eval_batch_size, ctx.device
        base = self.accuracy(model, val, ctx)
        floor = self.acc_cutoff if self.acc_cutoff is not None else base - self.acc_drop
        current = copy_model(model).eval()
        activity = channel_activity(current, site.rank_layer, tune.x, batch, device)
        channels = len(activity)
        cap = channels if self.prune_ratio is None else round(self.prune_ratio * channels)
        pruned = torch.zeros(channels, dtype=torch.bool)
        rounds = [{**self.round_row(ctx, current, 0, 0, channels, base), "accepted": True}]
        for index in range(1, self.max_rounds + 1):
            remaining = channels - int(pruned.sum())
            count = min(max(1, round(self.step * remaining)), cap - int(pruned.sum()))
            if count <= 0:
                break
            activity = channel_activity(current, site.rank_layer, tune.x, batch, device)
            order = pruning_order(activity, exclude=pruned)
            candidate_pruned = pruned.clone()
            candidate_pruned[order[:count]] = True
            candidate = mask_channels(copy_model(current), site, candidate_pruned)
            candidate = finetune(
                candidate, tune, ctx, self.lr, self.epochs, stream=f"fine-pruning-round-{index}"
            )
            val_acc = self.accuracy(candidate, val, ctx)
            row = self.round_row(
                ctx, candidate, index, int(candidate_pruned.sum()), channels, val_acc
            )
            row["accepted"] = val_acc >= floor - 1e-9
            rounds.append(row)
            log.info("fine-pruning round %d: %s", index, row)
            if not row["accepted"]:
                break
            current, pruned = candidate, candidate_pruned
        ctx.record(
            prune_layer=site.prune_layer,
            rank_layer=site.rank_layer,
            channels=channels,
            pruned_channels=int(pruned.sum()),
            pruned_fraction=int(pruned.sum()) / channels,
            val_acc_unpruned=base,
            val_acc_floor=floor,
            val_acc_final=[r for r in rounds if r["accepted"]][-1]["val_acc"],
            rounds=len(rounds) - 1,
        )
        self.write_rounds(ctx, site.prune_layer, rounds)
        return make_permanent(current).eval()

    def write_rounds(self, ctx: RunContext, layer: str, rounds: list[dict[str, Any]]) -> None:
        columns: Sequence[str] = ROUND_COLUMNS if self.curve else ROUND_COLUMNS[:5]
        rows = [{**r, "holdout_acc": r["val_acc"]} for r in rounds]
        write_pruning_curve(
            ctx.run_dir,
            f"pruning_curve_{self.name}",
            rows,
            ctx.logger,
            title=f"{self.name}: iterative fine-pruning of {layer} (after each round's fine-tuning)",
            columns=columns,
        )
