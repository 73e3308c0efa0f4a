"""Training without Lightning: `bdrun.training.fit` for one process on the CPU in full precision.

The optimisation is Lightning's automatic one, step for step, so both loops end with the same
weights (tests/test_training_loops.py):
- per batch: uint8 images to float; the hooks' batch rewrite, the forward pass and the loss
  (`bdrun.training.step_loss`); zero_grad, backward, the hooks' `on_after_backward`, the
  optimizer step, the hooks' `on_after_step`;
- per epoch: the divergence check, train/loss and train/acc to the run's logger, the hooks'
  epoch end, the scheduler step, the checkpoint of the finished epoch.

What it leaves out is what such a training never uses: accelerators, strategies, precision
plugins, callbacks. It imports nothing beyond torch, which spares a run Lightning's import
(3 to 4 s per process on 2 cores, docs/speed.md) and every `fit` the Trainer's set-up.
"""

from __future__ import annotations

import logging
import shutil
import signal
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from bdrun.data.base import ImageSet, to_float
from bdrun.data.loader import InMemoryLoader
from bdrun.errors import BdrunError, TrainingDiverged, TrainingInterrupted
from bdrun.finite import DivergenceWatch
from bdrun.fs import atomic_file
from bdrun.progress import progress
from bdrun.rng import seeded_global
from bdrun.training import (
    CHECKPOINT_FILE,
    PLAIN_CHECKPOINT,
    HardwareSettings,
    TrainingHook,
    TrainSettings,
    last_checkpoint,
    optimizer_and_scheduler,
    stage_name,
    step_loss,
    torch_threads,
    trained_weights,
)

log = logging.getLogger(__name__)


class PlainTrainer:
    """What hooks read of a Lightning Trainer: one process, the optimizers, `should_stop`."""

    world_size = 1
    global_rank = 0

    def __init__(self, optimizer: torch.optim.Optimizer) -> None:
        self.optimizers = [optimizer]
        self.should_stop = False
        self.received_sigterm = False
        self.resumable = False  # whether a checkpoint of each finished epoch is kept


class PlainTrainee:
    """The training as hooks see it (bdrun.training.Trainee)."""

    def __init__(
        self, model: nn.Module, data: ImageSet, settings: TrainSettings, trainer: PlainTrainer
    ) -> None:
        self.model = model
        self.data = data
        self.settings = settings
        self.trainer = trainer
        self.current_epoch = 0

    @property
    def device(self) -> torch.device:
        return torch.device("cpu")


def set_deterministic(mode: bool, warn_only: bool) -> None:
    """torch.use_deterministic_algorithms, without its import of torch._inductor (with
    torch._dynamo, 1.3 s) while no one has imported that: the inductor keeps a copy of the flag
    for torch.compile only, which bdrun does not use, and once it is loaded the public call
    sets both."""
    private = getattr(torch._C, "_set_deterministic_algorithms", None)
    if "torch._inductor.config" in sys.modules or private is None:
        torch.use_deterministic_algorithms(mode, warn_only=warn_only)
    else:
        private(mode, warn_only=warn_only)


@contextmanager
def deterministic_algorithms(hardware: HardwareSettings) -> Iterator[None]:
    """torch's deterministic-algorithm switch as trainer.deterministic sets it (as Lightning
    does: true, false or "warn"), restored afterwards."""
    before = torch.are_deterministic_algorithms_enabled()
    warn_before = torch.is_deterministic_algorithms_warn_only_enabled()
    warn = str(hardware.deterministic).lower() == "warn"
    set_deterministic(bool(hardware.deterministic), warn)
    try:
        yield
    finally:
        set_deterministic(before, warn_before)


@contextmanager
def sigterm_noted(trainer: PlainTrainer) -> Iterator[None]:
    """While training, SIGTERM sets trainer.received_sigterm (and still reaches a handler that
    was installed before); the loop stops after the current batch. Only the main thread can
    install a handler; elsewhere SIGTERM keeps its usual effect."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    before = signal.getsignal(signal.SIGTERM)

    def note(signum: int, frame: Any) -> None:
        log.info("received SIGTERM: stopping the training after this batch")
        trainer.received_sigterm = True
        if callable(before):
            before(signum, frame)

    signal.signal(signal.SIGTERM, note)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, before)


def save_checkpoint(
    folder: Path,
    trainee: PlainTrainee,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    epochs_done: int,
) -> None:
    """The state after `epochs_done` finished epochs, written atomically (a kill mid-write
    leaves the previous checkpoint)."""
    folder.mkdir(parents=True, exist_ok=True)
    state = {
        PLAIN_CHECKPOINT: 1,
        "epochs_done": epochs_done,
        "model": trainee.model.state_dict(),
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict() if scheduler is not None else None,
        "rng_state": torch.get_rng_state(),  # dropout draws from it
    }
    with atomic_file(folder / CHECKPOINT_FILE) as tmp:
        torch.save(state, tmp)


def fit(
    model: nn.Module,
    data: ImageSet,
    settings: TrainSettings,
    hardware: HardwareSettings,
    seed: int,
    hooks: list[TrainingHook] | tuple[TrainingHook, ...] = (),
    logger: Any = None,
    stream: str = "train",
    checkpoint_dir: Path | None = None,
) -> nn.Module:
    """`bdrun.training.fit` in the plain loop (the semantics are there)."""
    if len(data) == 0:
        raise BdrunError("the training set is empty")
    hooks = list(hooks)
    model.train()  # a cached model comes back in eval mode
    resume = checkpoint_dir is not None and all(h.resumable for h in hooks)
    with (
        seeded_global(seed, stream),
        torch_threads(hardware.num_threads),
        deterministic_algorithms(hardware),
        torch.enable_grad(),  # as Lightning trains: whatever the caller's grad mode
    ):
        if hardware.channels_last:
            model.to(memory_format=torch.channels_last)
        optimizer, scheduler = optimizer_and_scheduler(model.parameters(), settings)
        trainer = PlainTrainer(optimizer)
        trainer.resumable = resume
        trainee = PlainTrainee(model, data, settings, trainer)
        watch = DivergenceWatch(stage_name(stream), settings.lr, settings.epochs)
        loader = InMemoryLoader(data, settings.batch_size, shuffle=True, seed=seed)
        first_epoch = 0
        ckpt = last_checkpoint(Path(checkpoint_dir), PLAIN_CHECKPOINT) if resume else None
        if ckpt is not None and settings.epochs > 0:
            log.info("resuming training from %s", ckpt)
            state = torch.load(ckpt, map_location="cpu", weights_only=True)
            model.load_state_dict(state["model"])
            optimizer.load_state_dict(state["optimizer"])
            if scheduler is not None and state["scheduler"] is not None:
                scheduler.load_state_dict(state["scheduler"])
            torch.set_rng_state(state["rng_state"])
            first_epoch = state["epochs_done"]
        try:
            if first_epoch < settings.epochs:
                for hook in hooks:
                    hook.on_train_start(trainee)
            with sigterm_noted(trainer):
                for epoch in range(first_epoch, settings.epochs):
                    trainee.current_epoch = epoch
                    # one bar per epoch, numbered from 0 as Lightning's are
                    with progress(
                        f"Epoch {epoch}/{settings.epochs - 1}", len(loader), hardware.progress
                    ) as advance:
                        sums = run_epoch(trainee, hooks, loader, optimizer, hardware, advance)
                    # Lightning's step: the epoch's last, counted from 0 over the training
                    end_epoch(trainee, hooks, watch, logger, sums, (epoch + 1) * len(loader) - 1)
                    if scheduler is not None:
                        scheduler.step()
                    if resume:
                        save_checkpoint(
                            Path(checkpoint_dir), trainee, optimizer, scheduler, epoch + 1
                        )
                    if trainer.received_sigterm:
                        raise interrupted(trainee)
                    if trainer.should_stop:
                        break
        except TrainingDiverged:
            if checkpoint_dir is not None:
                shutil.rmtree(checkpoint_dir, ignore_errors=True)
            raise
    return model.to("cpu", memory_format=torch.contiguous_format).eval()


def run_epoch(
    trainee: PlainTrainee,
    hooks: list[TrainingHook],
    loader: InMemoryLoader,
    optimizer: torch.optim.Optimizer,
    hardware: HardwareSettings,
    advance: Any,
) -> Tensor | None:
    """One pass over the loader; returns the epoch's sums on the device (loss x samples,
    correct, samples). SIGTERM ends it after the current batch (the epoch end checks the
    last one)."""
    loader.epoch = trainee.current_epoch  # a resumed training continues with its permutation
    sums = None
    last = len(loader) - 1
    for index, (x, y, pos) in enumerate(loader):
        x = to_float(x)
        if hardware.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        loss, step_sums = step_loss(trainee, hooks, (x, y, pos))
        sums = step_sums if sums is None else sums + step_sums
        optimizer.zero_grad()
        loss.backward()
        for hook in hooks:
            hook.on_after_backward(trainee)
        optimizer.step()
        for hook in hooks:
            hook.on_after_step(trainee)
        advance(1)
        if index < last and trainee.trainer.received_sigterm:
            raise interrupted(trainee)
    return sums


def end_epoch(
    trainee: PlainTrainee,
    hooks: list[TrainingHook],
    watch: DivergenceWatch,
    logger: Any,
    sums: Tensor | None,
    step: int,
) -> None:
    """The epoch's divergence check (before the hooks act on a model that may be NaN), its
    figures (`run_epoch`'s sums) to the logger at `step`, the hooks' epoch end."""
    if sums is not None:  # the loss sum is not finite once any loss was not
        watch.observe(sums[0])
    watch.check(trainee.current_epoch + 1, trained_weights(trainee.model, hooks))
    if sums is not None and logger is not None:
        loss_sum, correct, seen = sums.tolist()
        # float32, as Lightning logs them: both loops write the same curves
        figures = torch.tensor([loss_sum / seen, correct / seen]).tolist()
        logger.log_training(
            {"train/loss": figures[0], "train/acc": figures[1]},
            epoch=trainee.current_epoch,
            step=step,
        )
    for hook in hooks:
        hook.on_epoch_end(trainee)


def interrupted(trainee: PlainTrainee) -> TrainingInterrupted:
    return TrainingInterrupted(
        f"training stopped by SIGTERM in epoch {trainee.current_epoch + 1} of "
        f"{trainee.settings.epochs}; run the same command again to "
        + ("resume from its last checkpoint" if trainee.trainer.resumable else "train again")
    )
