"""Anti-Backdoor Learning: isolate the samples learned too fast, train on the rest, unlearn them.

Li et al., "Anti-Backdoor Learning: Training Clean Models on Poisoned Data", NeurIPS 2021, and
the authors' code (github.com/bboylyg/ABL: config.py, backdoor_isolation.py,
backdoor_unlearning.py). Backdoor samples are learned much faster than clean ones; a loss that
keeps the training loss near gamma (local gradient ascent, LGA) or above a flood level lets them
sink to the bottom of the per-sample loss while clean samples cannot, so the lowest-loss share
of the training set is mostly poisoned. ABL isolates it, trains on, and finally unlearns the
isolated samples by gradient ascent.
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import math
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from bdrun.data.base import ImageSet
from bdrun.defenses.base import Defense, Trained
from bdrun.errors import BdrunError
from bdrun.metrics import accuracy, logits_of
from bdrun.training import Trainee, TrainingHook, TrainSettings

if TYPE_CHECKING:
    from bdrun.context import RunContext
    from bdrun.state import RunData

log = logging.getLogger(__name__)

LOSSES = ("lga", "flooding")
SCORES = ("late_max", "last")


def training_set_logits(module: Trainee, rows: slice = slice(None)) -> Tensor:
    """Logits of the training set's `rows` under the model being trained (eval mode, batched),
    at an epoch's end; the model goes back to training mode."""
    x = module.data.x[rows]
    logits = logits_of(module.model, x, module.settings.eval_batch_size, module.device)
    module.model.train()
    return logits


class LossRecord(nn.Module):
    """Every training sample's highest loss at the ends of the isolation epochs after the first
    `skip` (buffers, so the model cache stores it with the isolation model)."""

    def __init__(self, size: int, skip: int) -> None:
        super().__init__()
        self.skip = skip
        self.register_buffer("worst", torch.full((size,), -torch.inf, dtype=torch.float64))
        self.register_buffer("epochs", torch.zeros((), dtype=torch.int64))

    def reset(self) -> None:
        self.worst.fill_(-torch.inf)
        self.epochs.zero_()

    def add(self, losses: Tensor) -> None:
        self.epochs += 1
        if int(self.epochs) > self.skip:
            torch.maximum(self.worst, losses.double().to(self.worst.device), out=self.worst)


class IsolationLoss(TrainingHook):
    """The isolation stage's loss on the batch-mean cross-entropy l, as in the authors' code:
    LGA sign(l - gamma) * l (gradient ascent once l < gamma) or flooding |l - b| + b. With a
    `record`, it also records every training sample's loss after each epoch."""

    def __init__(
        self, kind: str, gamma: float, flooding: float, record: LossRecord | None = None
    ) -> None:
        self.kind = kind
        self.gamma = gamma
        self.flooding = flooding
        self.record = record
        self.resumable = record is None  # the record is state of its own

    def loss(self, logits: Tensor, y: Tensor, pos: Tensor, module: Trainee) -> Tensor:
        ce = F.cross_entropy(logits, y)
        if self.kind == "lga":
            return torch.sign(ce - self.gamma) * ce
        return (ce - self.flooding).abs() + self.flooding

    def on_train_start(self, module: Trainee) -> None:
        if self.record is not None:
            self.record.reset()

    @torch.no_grad()
    def on_epoch_end(self, module: Trainee) -> None:
        if self.record is None:
            return
        losses = F.cross_entropy(training_set_logits(module), module.data.y, reduction="none")
        self.record.add(losses)

    def modules(self) -> dict[str, nn.Module]:
        return {"record": self.record} if self.record is not None else {}


class GradientAscent(TrainingHook):
    """Minus the cross-entropy: every step moves away from the given labels (unlearning)."""

    resumable = True

    def loss(self, logits: Tensor, y: Tensor, pos: Tensor, module: Trainee) -> Tensor:
        return -F.cross_entropy(logits, y)


class MarginUnlearning(TrainingHook):
    """Unlearning by the logit margin: mean of max(0, z_y - max_{j != y} z_j), which keeps a
    gradient where the cross-entropy is saturated (a sample whose softmax is exactly 1 in float32
    gives minus the cross-entropy a zero gradient) and stops once a sample is misclassified."""

    resumable = True

    def loss(self, logits: Tensor, y: Tensor, pos: Tensor, module: Trainee) -> Tensor:
        given = logits.gather(1, y[:, None]).squeeze(1)
        best_other = logits.scatter(1, y[:, None], float("-inf")).amax(1)
        return (given - best_other).clamp(min=0).mean()


UNLEARNING_LOSSES = {"ascent": GradientAscent, "margin": MarginUnlearning}
ANCHORS = ("none", "holdout")


class AnchoredUnlearning(TrainingHook):
    """The unlearning loss on the first `forget` rows of the training set (the isolated samples)
    plus the cross-entropy on the others (clean anchor images), so that unlearning a trigger
    does not unlearn the class its clean-label poisons belong to."""

    resumable = True

    def __init__(self, unlearn: TrainingHook, forget: int) -> None:
        self.unlearn = unlearn
        self.forget = forget

    def loss(self, logits: Tensor, y: Tensor, pos: Tensor, module: Trainee) -> Tensor:
        forget = pos.to(logits.device) < self.forget
        loss = logits.new_zeros(())
        if forget.any():
            loss = loss + self.unlearn.loss(logits[forget], y[forget], pos[forget], module)
        if not forget.all():
            loss = loss + F.cross_entropy(logits[~forget], y[~forget])
        return loss


class UnlearningRecord(nn.Module):
    """Epochs of unlearning run and the isolated samples' accuracy after the last one (buffers,
    so the model cache stores them with the unlearned model)."""

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("epochs", torch.zeros((), dtype=torch.int64))
        self.register_buffer("accuracy", torch.full((), torch.nan, dtype=torch.float64))


class UnlearningStop(TrainingHook):
    """Records the isolated samples' accuracy on their training labels after every unlearning
    epoch (for the poisoned ones these are the attack's labels: the isolated set's own attack
    success) and ends the unlearning once it is at most `max_acc` (None: never). The isolated
    samples are the first `isolated` rows of the training set (None: all of it)."""

    resumable = False  # the record is state of its own

    def __init__(self, max_acc: float | None, isolated: int | None = None) -> None:
        self.max_acc = max_acc
        self.isolated = isolated
        self.record = UnlearningRecord()

    def on_train_start(self, module: Trainee) -> None:
        self.record.epochs.zero_()
        self.record.accuracy.fill_(torch.nan)

    @torch.no_grad()
    def on_epoch_end(self, module: Trainee) -> None:
        rows = slice(self.isolated)
        logits = training_set_logits(module, rows)
        isolated_acc = accuracy(logits.argmax(1), module.data.y[rows])
        self.record.epochs += 1
        self.record.accuracy.fill_(isolated_acc)
        if self.max_acc is not None and isolated_acc <= self.max_acc:
            module.trainer.should_stop = True

    def modules(self) -> dict[str, nn.Module]:
        return {"unlearning_record": self.record}


def per_sample_loss(model: nn.Module, data: ImageSet, ctx: RunContext) -> Tensor:
    """Cross-entropy of every training sample under `model` (batched, no augmentation)."""
    logits = logits_of(model, data.x, ctx.settings.eval_batch_size, ctx.device)
    return F.cross_entropy(logits, data.y, reduction="none")


class AntiBackdoorLearning(Defense):
    """ABL as a training-time defense: returns the unlearned model instead of standard training.

    Stages (defaults from the authors' config.py unless noted):
    1. isolation: train a fresh model for `isolation_epochs` (10, `tuning_epochs`) at a constant
       learning rate (their schedule keeps `lr` fixed in this stage) with the `loss` hook, LGA
       with `gamma` 0.5 or flooding at `flooding` 0.5 (their config defaults to flooding, the
       paper's main results use LGA, our default; with gamma = flooding both give the same
       gradients); isolate the `isolation_ratio` (1 %) of training samples with the lowest
       loss. `isolation_score` "last" ranks by the loss after the last isolation epoch (their
       code); "late_max" (default) by each sample's highest loss at the ends of the last half
       of the isolation epochs: a sample must stay low through LGA's swings, not at one
       moment (a single snapshot swings with the training loss; measured in
       docs/defenses/abl.md);
    2. training on: continue training that model on the other samples for `finetune_epochs`
       (null: train.epochs; they fine-tune for their full 60-epoch schedule);
    3. unlearning: the isolated samples are unlearned for up to `unlearning_epochs` (5) with
       SGD at `unlearning_lr` 5e-4, momentum 0.9, weight decay 1e-4, batch 64 (their
       `lr_unlearning_init`, `momentum`, `weight_decay`, `batch_size`).
       `unlearning_loss` "ascent" is their gradient ascent on the cross-entropy; "margin"
       (ours, the default) minimises the clamped logit margin instead, and `unlearning_stop`
       (ours, default 0.1; null runs every epoch as they do) ends the unlearning after the
       first epoch that leaves at most that share of the isolated samples on their training
       labels. Why: without data augmentation a small CNN drives the backdoor samples' softmax
       to exactly 1 in float32, where minus the cross-entropy has no gradient, so their ascent
       left the backdoor in place; the margin removes it, and after the first epoch that
       unlearns the isolated samples further epochs only cost clean accuracy (measured in
       docs/defenses/abl.md).
       `unlearning_anchor` "holdout" (ours; "none", theirs, is the default) adds the
       cross-entropy on the defender's clean holdout to every unlearning step. Why: a
       clean-label poison carries its true label, so unlearning it also unlearns its class
       (digits SIG: tuning/defense_dataset/abl_digits.yaml, docs/tuning/abl_digits.md).
    The report adds `isolated_top_label_share`, the share of the isolated samples that carry
    their most common label (a warning below 0.9): all-to-one and clean-label poisons share the
    target label, while on Fashion-MNIST SIG the lowest-loss 1 % were clean samples of several
    classes (docs/defenses/abl.md).
    The optimiser, batch size and learning rate of stages 1-2 are the run's `train` settings.
    Every stage goes through the model cache (`ctx.train_cached`; the loss record is stored
    with the isolation model), so a second run with the same data and settings trains nothing.
    """

    name = "abl"

    def __init__(
        self,
        isolation_ratio: float,
        loss: str,
        gamma: float,
        flooding: float,
        isolation_epochs: int,
        finetune_epochs: int | None,
        unlearning_epochs: int,
        unlearning_lr: float,
        unlearning_batch_size: int,
        unlearning_momentum: float,
        unlearning_weight_decay: float,
        isolation_score: str,
        unlearning_loss: str,
        unlearning_stop: float | None,
        unlearning_anchor: str,
    ) -> None:
        if not 0 < float(isolation_ratio) < 1:
            raise BdrunError(f"defense.isolation_ratio={isolation_ratio} must be in (0, 1)")
        if isolation_score not in SCORES:
            raise BdrunError(
                f"defense.isolation_score={isolation_score!r} must be one of {', '.join(SCORES)}"
            )
        if unlearning_loss not in UNLEARNING_LOSSES:
            raise BdrunError(
                f"defense.unlearning_loss={unlearning_loss!r} must be one of "
                + ", ".join(UNLEARNING_LOSSES)
            )
        if unlearning_stop is not None and not 0 <= float(unlearning_stop) < 1:
            raise BdrunError(f"defense.unlearning_stop={unlearning_stop} must be in [0, 1) or null")
        if unlearning_anchor not in ANCHORS:
            raise BdrunError(
                f"defense.unlearning_anchor={unlearning_anchor!r} must be one of "
                + ", ".join(ANCHORS)
            )
        if loss not in LOSSES:
            raise BdrunError(f"defense.loss={loss!r} must be one of {', '.join(LOSSES)}")
        epochs = {
            "isolation_epochs": isolation_epochs,
            "finetune_epochs": 0 if finetune_epochs is None else finetune_epochs,
            "unlearning_epochs": unlearning_epochs,
        }
        for key, value in epochs.items():
            if int(value) < 0:
                raise BdrunError(f"defense.{key}={value} must be >= 0")
        if float(unlearning_lr) <= 0 or int(unlearning_batch_size) < 1:
            raise BdrunError(
                "defense.unlearning_lr must be > 0 and defense.unlearning_batch_size >= 1"
            )
        self.isolation_ratio = float(isolation_ratio)
        self.isolation_score = isolation_score
        self.unlearning_loss = unlearning_loss
        self.unlearning_stop = None if unlearning_stop is None else float(unlearning_stop)
        self.unlearning_anchor = unlearning_anchor
        self.loss = loss
        self.gamma = float(gamma)
        self.flooding = float(flooding)
        self.isolation_epochs = int(isolation_epochs)
        self.finetune_epochs = None if finetune_epochs is None else int(finetune_epochs)
        self.unlearning_epochs = int(unlearning_epochs)
        self.unlearning_lr = float(unlearning_lr)
        self.unlearning_batch_size = int(unlearning_batch_size)
        self.unlearning_momentum = float(unlearning_momentum)
        self.unlearning_weight_decay = float(unlearning_weight_decay)

    def isolate(self, data: ImageSet, ctx: RunContext) -> tuple[Tensor, nn.Module]:
        """Bool mask of the isolated (lowest-loss) training samples after the isolation stage,
        and the isolation model (the cached one: copy it before training it on)."""
        settings = dataclasses.replace(ctx.settings, epochs=self.isolation_epochs, scheduler="none")
        record = None
        if self.isolation_score == "late_max" and self.isolation_epochs > 0:
            record = LossRecord(len(data), skip=self.isolation_epochs // 2)
        hook = IsolationLoss(self.loss, self.gamma, self.flooding, record)
        model, status = ctx.train_cached(
            data,
            hooks=[hook],
            settings=settings,
            extra_key={
                "abl_isolation": {
                    "loss": self.loss,
                    "gamma": self.gamma,
                    "flooding": self.flooding,
                    "record": record is not None,
                }
            },
            stream="abl-isolation",
        )
        log.info("ABL isolation model: cache %s", status)
        losses = record.worst if record is not None else per_sample_loss(model, data, ctx)
        count = min(max(1, round(self.isolation_ratio * len(data))), len(data))
        isolated = torch.zeros(len(data), dtype=torch.bool)
        isolated[losses.topk(count, largest=False).indices] = True
        return isolated, model

    def train(self, train_set: ImageSet, data: RunData, ctx: RunContext) -> Trained:
        """Isolate, train on without the isolated samples, unlearn them; the isolated samples
        are returned as set apart, for the runner to score against the poison ground truth."""
        isolated, isolation_model = self.isolate(train_set, ctx)
        # the defender's own check of ABL's premise that a backdoor is tied to one class
        share = float(train_set.y[isolated].bincount().max()) / int(isolated.sum())
        ctx.record(isolated_top_label_share=share)
        log.info("ABL isolated %d samples (top label share %.2f)", int(isolated.sum()), share)
        if share < 0.9:
            cost = (
                "; the clean holdout limits what unlearning them costs"
                if self.unlearning_anchor == "holdout"
                else ", and unlearning them costs clean accuracy"
            )
            warning = (
                f"ABL: the isolated samples spread over several labels (the most common holds "
                f"{100 * share:.0f} %); against an all-to-one or clean-label attack the isolation "
                f"likely caught easy clean samples{cost}"
            )
            log.warning(warning)
            ctx.record(warnings=[warning])  # printed under the run's summary table
        model = copy.deepcopy(isolation_model)  # the cached isolation model stays as is
        epochs = ctx.settings.epochs if self.finetune_epochs is None else self.finetune_epochs
        if epochs > 0:
            model, status = ctx.train_cached(
                train_set.subset(~isolated),
                settings=dataclasses.replace(ctx.settings, epochs=epochs),
                model=model,
                extra_key={"abl": "train on without the isolated samples"},
                stream="abl-finetune",
            )
            log.info("ABL model trained on: cache %s", status)
        unlearning = TrainSettings(
            epochs=self.unlearning_epochs,
            batch_size=self.unlearning_batch_size,
            optimizer="sgd",
            lr=self.unlearning_lr,
            momentum=self.unlearning_momentum,
            weight_decay=self.unlearning_weight_decay,
            scheduler="none",
            label_smoothing=0.0,  # the unlearning losses are its own (UNLEARNING_LOSSES)
            eval_batch_size=ctx.settings.eval_batch_size,
        )
        # the isolated samples come first, the clean anchor images (if any) after them
        unlearning_set = train_set.subset(isolated)
        isolated_count = len(unlearning_set)
        unlearn: TrainingHook = UNLEARNING_LOSSES[self.unlearning_loss]()
        if self.unlearning_anchor == "holdout":
            unlearn = AnchoredUnlearning(unlearn, forget=isolated_count)
            unlearning_set = ImageSet.concat([unlearning_set, data.holdout])
        stop = UnlearningStop(self.unlearning_stop, isolated=isolated_count)
        model, status = ctx.train_cached(
            unlearning_set,
            hooks=[unlearn, stop],
            settings=unlearning,
            model=model,
            extra_key={
                "abl": "gradient ascent",
                "loss": self.unlearning_loss,
                "stop": self.unlearning_stop,
                "anchor": self.unlearning_anchor,
            },
            stream="abl-unlearning",
        )
        log.info("ABL model unlearned: cache %s", status)
        after = float(stop.record.accuracy)  # NaN: no epoch ran
        ctx.record(
            unlearning_epochs_run=int(stop.record.epochs),
            isolated_acc_after=None if math.isnan(after) else after,
        )
        return Trained(model, set_apart=isolated)
