"""Fine-tuning on the defender's clean holdout data (Liu et al. 2018's `fine-tuning' defense)."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from torch import nn

from bdrun.defenses.base import NOTHING_CARRIED, Carried, Defense
from bdrun.defenses.pruning import copy_model
from bdrun.errors import BdrunError
from bdrun.validate import check_schedule, check_sgd

if TYPE_CHECKING:
    from bdrun.context import RunContext
    from bdrun.data.base import ImageSet
    from bdrun.state import RunData
    from bdrun.training import TrainingHook, TrainSettings


def finetune(
    model: nn.Module,
    data: ImageSet,
    ctx: RunContext,
    lr: float,
    epochs: int,
    stream: str = "finetune",
    cache_key: dict[str, Any] | None = None,
    hooks: Sequence[TrainingHook] = (),
    settings: TrainSettings | None = None,
) -> nn.Module:
    """A copy of `model` trained `epochs` epochs on `data` with learning rate `lr`.

    Everything else (optimizer, batch size, schedule, weight decay) is `settings`, by default the
    run's `train` setting. The attack's training hooks stay off: this is the defender's
    training, on clean data; `hooks` are the defense's own (FT-SAM's second pass, FST's loss).
    Channels pruned with torch's pruning masks stay zero while training.
    With a `cache_key` (what else determines the result, e.g. the defense's name and its hooks'
    configuration) the tuned copy goes through the model cache.
    """
    tuned = copy_model(model)
    if epochs == 0 or len(data) == 0:
        return tuned.eval()
    tuned.train()  # the training loops keep a module's mode; the cached model arrives in eval mode
    settings = dataclasses.replace(settings or ctx.settings, lr=lr, epochs=epochs)
    if cache_key is None:
        return ctx.train(
            data, hooks, settings=settings, model=tuned, stream=stream, attack_hooks=False
        )
    tuned, _status = ctx.train_cached(
        data,
        hooks,
        settings=settings,
        extra_key=cache_key,
        stream=stream,
        model=tuned,
        attack_hooks=False,
    )
    return tuned


class OwnSgd:
    """A fine-tuning defense's own SGD (FT-SAM's, FST's): learning rate, epochs (at least one),
    batch size, momentum and weight decay, checked; cosine annealing over the epochs."""

    def __init__(
        self, lr: float, epochs: int, batch_size: int, momentum: float, weight_decay: float
    ) -> None:
        self.lr, self.epochs = check_schedule(lr, epochs)
        if self.epochs < 1:
            raise BdrunError(f"defense.epochs={epochs} must be >= 1")
        self.batch_size, self.momentum, self.weight_decay = check_sgd(
            batch_size, momentum, weight_decay
        )

    def settings(self, base: TrainSettings, label_smoothing: float) -> TrainSettings:
        """`base` (the run's `train` settings) with this SGD, its lr and epochs."""
        return dataclasses.replace(
            base,
            lr=self.lr,
            epochs=self.epochs,
            batch_size=self.batch_size,
            optimizer="sgd",
            momentum=self.momentum,
            weight_decay=self.weight_decay,
            scheduler="cosine",
            label_smoothing=label_smoothing,
        )


class FineTune(Defense):
    """Retrain the poisoned model on the clean holdout with a small learning rate.

    Liu, Dolan-Gavitt & Garg, "Fine-Pruning" (RAID 2018), Sec. 3.1 evaluate fine-tuning alone as
    a defense and find it weakens but rarely removes a backdoor: clean data seldom activates the
    backdoor neurons, so their weights barely move.

    Parameters:
        lr: learning rate, 0.01 as in BackdoorBench's fine-tuning / fine-pruning configs
            (config/defense/fp/config.yaml), below the 0.05 the small models train with.
        epochs: passes over the holdout (BackdoorBench runs 100 on 5 % of CIFAR-10; 10 keeps
            CPU runs short and already converges on a few thousand images).
    """

    def __init__(self, lr: float, epochs: int) -> None:
        self.lr, self.epochs = check_schedule(lr, epochs)

    def repair(
        self, model: nn.Module, data: RunData, ctx: RunContext, carried: Carried = NOTHING_CARRIED
    ) -> nn.Module:
        return finetune(model, data.holdout, ctx, self.lr, self.epochs, stream="finetune")
