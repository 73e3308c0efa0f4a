"""Training in Lightning's loop: the LightningModule around a plain nn.Module and `fit`, the
Trainer set-up. `bdrun.training.fit` imports it for trainings that need Lightning (GPUs, DDP,
mixed precision, trainer.loop=lightning), so other runs never pay for importing Lightning.
"""

from __future__ import annotations

import logging
import shutil
import warnings
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
from pytorch_lightning.utilities.exceptions import SIGTERMException
from torch import Tensor, nn

from bdrun.data.base import ImageSet, to_float
from bdrun.data.loader import InMemoryLoader
from bdrun.errors import BdrunError, TrainingDiverged, TrainingInterrupted
from bdrun.finite import DivergenceWatch
from bdrun.loggers import RunLogger
from bdrun.rng import seeded_global
from bdrun.training import (
    CHECKPOINT_FILE,
    LIGHTNING_CHECKPOINT,
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


class ClassifierModule(pl.LightningModule):
    """Lightning wrapper: cross-entropy training of `model` on an in-memory ImageSet.

    `stage` names the training in the error a diverging one ends with (see `stage_name`).
    """

    def __init__(
        self,
        model: nn.Module,
        data: ImageSet,
        settings: TrainSettings,
        seed: int,
        hooks: list[TrainingHook] | tuple[TrainingHook, ...] = (),
        channels_last: bool = False,
        data_on_device: bool = False,
        stage: str = "the training",
    ) -> None:
        super().__init__()
        self.model = model
        self.watch = DivergenceWatch(stage, settings.lr, settings.epochs)
        self.data_on_device = data_on_device
        self.data = data
        self.settings = settings
        self.seed = seed
        self.hooks = list(hooks)
        self.channels_last = channels_last
        # the epoch's loss sum, correct predictions and samples, kept on the device: one
        # Lightning log call per epoch instead of one per step (a fifth of a digits training)
        self.epoch_sums: Tensor | None = None

    def forward(self, x: Tensor) -> Tensor:
        return self.model(x)

    def train_dataloader(self) -> InMemoryLoader:
        trainer = self.trainer
        # train.batch_size is the global batch: with DDP each of the world_size ranks takes its
        # share of it, so the optimisation (and the result) does not depend on the device count
        self._loader = InMemoryLoader(
            self.data,
            max(1, self.settings.batch_size // trainer.world_size),
            shuffle=True,
            seed=self.seed,
            rank=trainer.global_rank,
            world_size=trainer.world_size,
            device=self.device if self.data_on_device and self.device.type == "cuda" else None,
        )
        return self._loader

    def on_train_epoch_start(self) -> None:
        # a training resumed from a checkpoint continues with that epoch's permutation
        loader = getattr(self, "_loader", None)
        if loader is not None:
            loader.epoch = self.current_epoch

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        # dropout draws from the global RNG: keep its state so a resumed run matches
        checkpoint["bdrun_rng_state"] = torch.get_rng_state()

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        state = checkpoint.get("bdrun_rng_state")
        if isinstance(state, Tensor):
            torch.set_rng_state(state)

    def on_after_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        x, y, pos = batch
        x = to_float(x)  # uint8 crosses to the device as bytes and becomes float there
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        return x, y, pos

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        loss, sums = step_loss(self, self.hooks, batch)
        self.epoch_sums = sums if self.epoch_sums is None else self.epoch_sums + sums
        return loss

    def setup(self, stage: str) -> None:
        quiet_lightning()  # again in DDP worker processes, which start with fresh settings

    def on_train_start(self) -> None:
        for hook in self.hooks:
            hook.on_train_start(self)

    def on_after_backward(self) -> None:
        for hook in self.hooks:
            hook.on_after_backward(self)

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        # Lightning calls it after the automatic optimizer step, where the plain loop calls it
        for hook in self.hooks:
            hook.on_after_step(self)

    def on_train_epoch_end(self) -> None:
        # before the epoch's checkpoint is written (Lightning saves it after this hook), and
        # before the hooks act on a model that may be NaN; raising ends trainer.fit
        if self.epoch_sums is not None:  # the loss sum is not finite once any loss was not
            self.watch.observe(self.epoch_sums[0])
        self.watch.check(self.current_epoch + 1, trained_weights(self.model, self.hooks))
        if self.epoch_sums is not None:
            # sums over every rank: the epoch's loss and accuracy over all its samples
            loss_sum, correct, seen = self.trainer.strategy.reduce(
                self.epoch_sums, reduce_op="sum"
            ).tolist()
            self.log_dict({"train/loss": loss_sum / seen, "train/acc": correct / seen})
            self.epoch_sums = None
        for hook in self.hooks:
            hook.on_epoch_end(self)

    def configure_optimizers(self) -> Any:
        opt, sched = optimizer_and_scheduler(self.model.parameters(), self.settings)
        if sched is None:
            return opt
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "epoch"}}


def quiet_lightning() -> None:
    """Keep Lightning's banner lines and advice out of the console (they reach the log file)."""
    for name in ("pytorch_lightning", "lightning.pytorch", "lightning_fabric", "lightning"):
        logging.getLogger(name).setLevel(logging.WARNING)
    warnings.filterwarnings("ignore", message=".*does not have many workers.*")
    warnings.filterwarnings("ignore", message=".*`training_step` returned `None`.*")
    warnings.filterwarnings("ignore", message=".*LeafSpec.*")
    # Lightning advises `srun` whenever Slurm is installed, also for runs not meant for it
    warnings.filterwarnings("ignore", message=".*`srun` command is available.*")


DIVERGED_IN_WORKER = f"{TrainingDiverged.__module__}.{TrainingDiverged.__name__}: "


def fit(
    model: nn.Module,
    data: ImageSet,
    settings: TrainSettings,
    hardware: HardwareSettings,
    seed: int,
    hooks: list[TrainingHook] | tuple[TrainingHook, ...] = (),
    logger: RunLogger | None = None,
    stream: str = "train",
    checkpoint_dir: Path | None = None,
) -> nn.Module:
    """`bdrun.training.fit` in Lightning's loop, the one for GPUs, DDP and mixed precision
    (the semantics are there). `logger`'s Lightning logger takes the training curves."""
    quiet_lightning()
    if len(data) == 0:
        raise BdrunError("the training set is empty")
    # Lightning keeps the mode it is given; a cached model comes back in eval mode
    model.train()
    with seeded_global(seed, stream), torch_threads(hardware.num_threads):
        module = ClassifierModule(
            model,
            data,
            settings,
            seed,
            hooks=hooks,
            channels_last=hardware.channels_last,
            data_on_device=hardware.keeps_data_on_device(data),
            stage=stage_name(stream),
        )
        if hardware.channels_last:
            module.model.to(memory_format=torch.channels_last)
        spawned = "spawn" in str(hardware.strategy)
        owner = next((hook for hook in hooks if hook.modules()), None)
        if spawned and owner is not None:
            raise BdrunError(
                f"trainer.strategy={hardware.strategy} cannot train the modules of "
                f"{type(owner).__name__} (they would stay in the worker processes); "
                "use trainer=cpu or trainer=gpu for this attack or defense"
            )
        resume = checkpoint_dir is not None and all(h.resumable for h in hooks)
        callbacks: list[pl.Callback] = []
        if resume:
            callbacks.append(epoch_checkpoint(Path(checkpoint_dir)))
        if hardware.show_progress():
            from pytorch_lightning.callbacks import RichProgressBar

            callbacks.append(RichProgressBar(leave=False))
        trainer = pl.Trainer(
            accelerator=hardware.accelerator,
            devices=hardware.devices,
            strategy=hardware.strategy,
            precision=hardware.precision,
            max_epochs=settings.epochs,
            deterministic=hardware.deterministic,
            benchmark=hardware.benchmark,
            logger=logger.lightning() if logger is not None else False,
            enable_checkpointing=resume,
            callbacks=callbacks,
            enable_model_summary=False,
            enable_progress_bar=hardware.show_progress(),
            num_sanity_val_steps=0,
            use_distributed_sampler=False,
            log_every_n_steps=1,
        )
        if settings.epochs > 0:
            ckpt = last_checkpoint(Path(checkpoint_dir), LIGHTNING_CHECKPOINT) if resume else None
            if ckpt is not None:
                logging.getLogger(__name__).info("resuming training from %s", ckpt)
            try:
                try:
                    trainer.fit(module, ckpt_path=ckpt, weights_only=True)
                except torch.multiprocessing.ProcessRaisedException as err:
                    # ddp_spawn: a worker's exception arrives as its traceback's text
                    line = next(
                        (ln for ln in str(err).splitlines() if ln.startswith(DIVERGED_IN_WORKER)),
                        None,
                    )
                    if line is None:
                        raise
                    raise TrainingDiverged(line.removeprefix(DIVERGED_IN_WORKER)) from None
            except TrainingDiverged:
                if checkpoint_dir is not None:
                    shutil.rmtree(checkpoint_dir, ignore_errors=True)
                raise
            except SIGTERMException:
                raise TrainingInterrupted(
                    f"training stopped by SIGTERM in epoch {trainer.current_epoch + 1} of "
                    f"{settings.epochs}; run the same command again to "
                    + ("resume from its last checkpoint" if resume else "train again")
                ) from None
    trained = module.model.to("cpu", memory_format=torch.contiguous_format).eval()
    return trained


def epoch_checkpoint(folder: Path) -> pl.Callback:
    """Lightning callback that keeps one checkpoint, of the last finished epoch, in `folder`
    (written atomically by Lightning: a kill mid-write leaves the previous one)."""
    from pytorch_lightning.callbacks import ModelCheckpoint

    return ModelCheckpoint(
        dirpath=str(folder),
        filename=Path(CHECKPOINT_FILE).stem,
        save_top_k=1,
        every_n_epochs=1,
        save_on_train_epoch_end=True,
        enable_version_counter=False,
    )
