"""The pruning defense (Liu et al. 2018): remove the conv channels clean data leaves dormant."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

from bdrun.cache import content_key
from bdrun.defenses.base import NOTHING_CARRIED, Carried, Defense
from bdrun.defenses.pruning import (
    PruneSite,
    channel_activity,
    copy_model,
    make_permanent,
    mask_channels,
    masked_predictions,
    pruned_mask,
    pruning_order,
    resolve_site,
)
from bdrun.errors import BdrunError
from bdrun.metrics import accuracy
from bdrun.report.pruning_curve import write_pruning_curve
from bdrun.validate import coerce, fraction

if TYPE_CHECKING:
    from bdrun.context import RunContext
    from bdrun.state import RunData


def stop_count(holdout_acc: Tensor, acc_drop: float) -> int:
    """How many channels to prune: one fewer than the first count whose holdout accuracy is more
    than `acc_drop` below the unpruned model's (holdout_acc[0]); all of them when none is.

    This is Fine-Pruning's stop: prune in order until clean validation accuracy falls by the
    threshold, and keep the last network that had not.
    """
    floor = float(holdout_acc[0]) - acc_drop - 1e-9  # tolerance: 0.9 - 0.04 is not 0.86 in binary
    below = (holdout_acc < floor).nonzero().flatten()
    return int(below[0]) - 1 if len(below) else len(holdout_acc) - 1


def curve_counts(channels: int, points: int, extra: Sequence[int] = ()) -> list[int]:
    """Channel counts at which a curve is scored: every count when there are few channels, else
    `points` evenly spaced ones, plus the `extra` counts (stops)."""
    if channels + 1 <= points:
        counts = set(range(channels + 1))
    else:
        grid = torch.linspace(0, channels, points).round().long().tolist()
        counts = set(grid)
    return sorted(counts | {int(c) for c in extra})


def keep_rows(order: Tensor, counts: Sequence[int], channels: int) -> Tensor:
    """Float [len(counts), C]: row i keeps every channel but the first counts[i] of `order`."""
    return torch.stack([~pruned_mask(order, k, channels) for k in counts]).float()


@dataclass
class PrunePlan:
    """What one pass of ranking decided, with the scoring-only curve."""

    site: PruneSite
    channels: int
    order: Tensor  # channel indices, least active first
    holdout_acc: Tensor  # [C + 1]: holdout accuracy with the first k channels of order pruned
    count: int  # channels pruned
    rows: list[dict[str, Any]] = field(default_factory=list)
    stops: list[dict[str, Any]] = field(default_factory=list)

    curve_cache: str = "not scored"

    @property
    def pruned(self) -> Tensor:
        return pruned_mask(self.order, self.count, self.channels)

    def figures(self) -> dict[str, Any]:
        """The plan's figures for results.json (metrics.detection)."""
        return {
            "prune_layer": self.site.prune_layer,
            "rank_layer": self.site.rank_layer,
            "channels": self.channels,
            "pruned_channels": self.count,
            "pruned_fraction": self.count / self.channels,
            "holdout_acc_unpruned": float(self.holdout_acc[0]),
            "holdout_acc_pruned": float(self.holdout_acc[self.count]),
            "prune_stops": self.stops,
            "curve_cache": self.curve_cache,
        }


class Prune(Defense):
    """Prune the channels of one conv layer in increasing order of mean activation on clean data.

    Liu, Dolan-Gavitt & Garg, "Fine-Pruning: Defending Against Backdooring Attacks on Deep
    Neural Networks" (RAID 2018), Sec. 3.1: the defender runs its clean validation data through
    the network, averages each channel of the last conv layer, and prunes the most dormant first
    until validation accuracy drops by a threshold. Pruned channels output exactly zero
    (torch.nn.utils.prune masks on the conv's weight and bias; see bdrun.defenses.pruning).

    Parameters:
        prune_ratio: prune this fraction of the channels; null stops on `acc_drop` instead.
        acc_drop: stop before the holdout accuracy falls more than this below the unpruned
            model's. 0.04 is the middle of the 2 / 4 / 10 % stops of the CSAW-HackML 2020 lab
            (the repaired networks it asks for); the paper leaves the threshold to the defender.
        stop_drops, stop_fractions: further stops reported in one pass (results and curve
            plot), without changing the repair.
        prune_layer, rank_layer: the conv whose output channels are pruned and the module whose
            output ranks them; null takes the model's own (its last conv; for the CSAW DeepID
            net conv_3 ranked by pool_3, as in the authors' face/conv_output_prune.py).
        curve: score CCA / ASR / RA on the test sets at every pruning level (scoring only, never
            a decision) and write pruning_curve_<name>.csv / .png.
        curve_points: at most this many levels on the curve (every level for small layers).
        curve_samples: score the curve on at most this many test / backdoor inputs (null: all).
    """

    def __init__(
        self,
        prune_ratio: float | None,
        acc_drop: float,
        stop_drops: Sequence[float],
        stop_fractions: Sequence[float],
        prune_layer: str | None,
        rank_layer: str | None,
        curve: bool,
        curve_points: int,
        curve_samples: int | None,
    ) -> None:
        self.prune_ratio = fraction(prune_ratio, "defense.prune_ratio", allow_none=True)
        self.acc_drop = fraction(acc_drop, "defense.acc_drop")
        self.stop_drops = [fraction(d, "defense.stop_drops") for d in stop_drops or ()]
        self.stop_fractions = [fraction(f, "defense.stop_fractions") for f in stop_fractions or ()]
        self.prune_layer, self.rank_layer = prune_layer, rank_layer
        self.curve = bool(curve)
        self.curve_points = max(2, coerce(curve_points, "int", "defense.curve_points"))
        self.curve_samples = (
            None if curve_samples is None else coerce(curve_samples, "int", "defense.curve_samples")
        )

    # -- planning -------------------------------------------------------------------------------
    def chosen_count(self, holdout_acc: Tensor, channels: int) -> int:
        if self.prune_ratio is not None:
            return round(self.prune_ratio * channels)
        return stop_count(holdout_acc, self.acc_drop)

    def make_plan(self, model: nn.Module, data: RunData, ctx: RunContext) -> PrunePlan:
        """Rank the channels on the clean holdout, measure the holdout accuracy at every pruning
        level, and pick the count; the curve is scored on the test sets when `curve` is on."""
        holdout = data.holdout
        if len(holdout) == 0:
            raise BdrunError("the clean holdout set is empty; raise dataset.holdout_fraction")
        site = resolve_site(model, self.prune_layer, self.rank_layer)
        batch, device = ctx.settings.eval_batch_size, ctx.device
        activity = channel_activity(model, site.rank_layer, holdout.x, batch, device)
        channels = len(activity)
        order = pruning_order(activity)
        every = list(range(channels + 1))
        preds = masked_predictions(
            model, site.rank_layer, holdout.x, keep_rows(order, every, channels), batch, device
        )
        holdout_acc = torch.tensor([accuracy(p, holdout.y) for p in preds], dtype=torch.float64)
        plan = PrunePlan(
            site, channels, order, holdout_acc, self.chosen_count(holdout_acc, channels)
        )
        stops = self.stop_points(plan)
        if self.curve:
            plan.rows, plan.curve_cache = self.cached_curve(
                model, data, ctx, plan, [s["pruned"] for s in stops]
            )
            by_count = {row["pruned"]: row for row in plan.rows}
            for stop in stops:
                stop.update({k: by_count[stop["pruned"]][k] for k in ("cca", "asr", "ra")})
            write_pruning_curve(
                ctx.run_dir,
                f"pruning_curve_{self.name}",
                plan.rows,
                ctx.logger,
                title=f"{self.name}: pruning {site.prune_layer} (ranked by {site.rank_layer})",
                stops=stops,
            )
        plan.stops = stops
        ctx.record(**plan.figures())
        return plan

    def stop_points(self, plan: PrunePlan) -> list[dict[str, Any]]:
        """The repair's own stop plus every reported one, with holdout accuracy."""
        points = [("chosen", plan.count)]
        points += [(f"acc drop {d:.0%}", stop_count(plan.holdout_acc, d)) for d in self.stop_drops]
        points += [(f"{f:.0%} pruned", round(f * plan.channels)) for f in self.stop_fractions]
        return [
            {
                "label": label,
                "pruned": count,
                "fraction": count / plan.channels,
                "holdout_acc": float(plan.holdout_acc[count]),
            }
            for label, count in points
        ]

    def cached_curve(
        self,
        model: nn.Module,
        data: RunData,
        ctx: RunContext,
        plan: PrunePlan,
        extra: Sequence[int],
    ) -> tuple[list[dict[str, Any]], str]:
        """`score_curve` at the grid levels through the cache, plus the stops off the grid, and
        the cache status of the grid's scores ("hit", "miss", "off"): the
        jobs of a sweep over the fine-tuning lr or the prune ratio prune the same poisoned model
        in the same order, so they share its curve (scored once: most of a fine-pruning job's
        time on Fashion-MNIST); only their own stops are scored per job."""
        grid = curve_counts(plan.channels, self.curve_points)
        key = content_key(
            {
                **ctx.key_parts,
                "what": "pruning curve",
                "weights": model.state_dict(),
                "layer": plan.site.rank_layer,
                "order": plan.order,
                "holdout_acc": plan.holdout_acc,
                "counts": grid,
                "test": [data.test.x, data.test.y],
                "backdoor": [data.backdoor_test.x, data.backdoor_test.y, data.backdoor_test.orig_y],
                "curve_samples": self.curve_samples,
            }
        )
        meta = {"what": "pruning curve", "layer": plan.site.prune_layer, "levels": len(grid)}
        rows, status = ctx.cache.get_or_compute(
            key, lambda: self.score_curve(model, data, ctx, plan, grid), meta
        )
        off_grid = sorted({*extra, plan.count} - set(grid))
        if off_grid:
            rows = sorted(
                [*rows, *self.score_curve(model, data, ctx, plan, off_grid)],
                key=lambda r: r["pruned"],
            )
        return rows, status

    def score_curve(
        self,
        model: nn.Module,
        data: RunData,
        ctx: RunContext,
        plan: PrunePlan,
        counts: Sequence[int],
    ) -> list[dict[str, Any]]:
        """CCA, ASR and RA on the test sets at each of `counts` pruning levels (scoring only)."""
        keeps = keep_rows(plan.order, counts, plan.channels)
        g = ctx.generator("pruning-curve")
        test = data.test.random_subset(self.curve_samples, g)
        backdoor = data.backdoor_test.random_subset(self.curve_samples, g)
        batch, device = ctx.settings.eval_batch_size, ctx.device
        layer = plan.site.rank_layer
        clean_preds = masked_predictions(model, layer, test.x, keeps, batch, device)
        bd_preds = (
            masked_predictions(model, layer, backdoor.x, keeps, batch, device)
            if len(backdoor)
            else torch.empty(len(counts), 0, dtype=torch.long)
        )
        return [
            {
                "pruned": k,
                "fraction": k / plan.channels,
                "holdout_acc": float(plan.holdout_acc[k]),
                "cca": accuracy(clean_preds[i], test.y),
                "asr": accuracy(bd_preds[i], backdoor.y),
                "ra": accuracy(bd_preds[i], backdoor.orig_y),
            }
            for i, k in enumerate(counts)
        ]

    # -- the defense stage ---------------------------------------------------------------------
    def pruned_copy(self, model: nn.Module, data: RunData, ctx: RunContext) -> nn.Module:
        """A copy of `model` with the planned channels masked (torch pruning masks kept, so
        they stay zero if the copy is trained further)."""
        plan = self.make_plan(model, data, ctx)
        return mask_channels(copy_model(model), plan.site, plan.pruned).eval()

    def repair(
        self, model: nn.Module, data: RunData, ctx: RunContext, carried: Carried = NOTHING_CARRIED
    ) -> nn.Module:
        return make_permanent(self.pruned_copy(model, data, ctx))
