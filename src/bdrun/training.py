"""Training settings, hooks, checkpoints, the optimisation step both training loops share, and
`fit`, which picks the loop.

Two loops train a model, with the same arithmetic (tests/test_training_loops.py holds them to
the same weights):
- `bdrun.plain_loop`: one process on the CPU in full precision, the default there. It imports
  nothing beyond torch, so a run does not pay Lightning's import (3 to 4 s, docs/speed.md).
- `bdrun.lightning_loop`: a LightningModule around the model, for everything else (GPUs, DDP,
  mixed precision) and wherever `trainer.loop=lightning` asks for it.

Training-time attacks and defenses plug in as TrainingHooks: they may rewrite each batch
(WaNet, input-aware triggers) or the loss (ABL), act after the backward pass (FT-SAM's second
pass) and after the optimizer step (FST's projection), and see every epoch end.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, Protocol

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from bdrun.data.base import ImageSet
from bdrun.errors import BdrunError
from bdrun.progress import enabled as progress_enabled
from bdrun.validate import coerce

OPTIMIZERS = ("sgd", "adam", "adamw", "radam")
SCHEDULERS = ("cosine", "step", "none")
LOOPS = ("auto", "plain", "lightning")
PLAIN_PRECISIONS = ("32-true", "32", 32)


def run_seed(value: Any) -> int:
    """The run's `seed` as an int; anything but an integer is a user error.

    Any integer works, negative ones too: seeds only reach torch and sklearn through
    bdrun.rng.derive_seed, which maps them to [0, 2**63).
    """
    try:
        return coerce(value, "int", "seed")
    except BdrunError as err:
        raise BdrunError(f"{err}, e.g. seed=0") from None


@dataclass
class TrainSettings:
    """Optimisation settings (the `train` config node; its values are conf/config.yaml's, and
    `train_settings` gives them to code that builds settings itself).

    scheduler: cosine (annealing to 0), step (x0.1 at 50 % and 75 % of the epochs) or none.
    """

    epochs: int
    batch_size: int
    optimizer: str
    lr: float
    momentum: float
    weight_decay: float
    scheduler: str
    label_smoothing: float
    eval_batch_size: int

    @classmethod
    def from_config(cls, node: Any) -> TrainSettings:
        known = {f.name: f.type for f in fields(cls)}
        values = dict(node or {})
        unknown = sorted(set(values) - set(known))
        if unknown:
            raise BdrunError(
                f"unknown train setting {unknown[0]!r}; known: {', '.join(sorted(known))}"
            )
        missing = sorted(set(known) - set(values))
        if missing:
            raise BdrunError(
                f"train.{missing[0]} has no value; set it, e.g. train.{missing[0]}=..."
            )
        values = {
            name: coerce(value, known[name], f"train.{name}") for name, value in values.items()
        }
        settings = cls(**values)
        if settings.optimizer not in OPTIMIZERS:
            raise BdrunError(
                f"train.optimizer={settings.optimizer!r} must be one of {', '.join(OPTIMIZERS)}"
            )
        if settings.scheduler not in SCHEDULERS:
            raise BdrunError(
                f"train.scheduler={settings.scheduler!r} must be one of {', '.join(SCHEDULERS)}"
            )
        if settings.epochs < 0 or settings.batch_size < 1 or settings.lr <= 0:
            raise BdrunError("train.epochs must be >= 0, train.batch_size >= 1 and train.lr > 0")
        return settings


DATA_ON_DEVICE_AUTO_BYTES = 4 << 30  # CIFAR-10 as uint8 is 150 MB, GTSRB 120 MB


@dataclass
class HardwareSettings:
    """Where and how Lightning runs (the `trainer` config node; its values are
    conf/trainer/<name>.yaml's, and `hardware_settings` gives them to code that builds settings
    itself).

    benchmark: cuDNN autotuning (trainer=gpu: on); None = torch's setting.
    progress: true, false, or auto (on for a terminal, off under CI=true).
    data_on_device: keep the training images on the GPU (true, false, or auto: when they take
        at most DATA_ON_DEVICE_AUTO_BYTES); no effect on the CPU.
    loop: which training loop runs (module docstring): auto (the plain loop where it can, one
        process on the CPU in full precision; Lightning elsewhere), plain, or lightning.
    """

    accelerator: str
    devices: Any
    strategy: str
    precision: str
    channels_last: bool
    deterministic: bool
    benchmark: bool | None
    num_threads: int | None
    progress: Any
    data_on_device: Any
    loop: str

    @classmethod
    def from_config(cls, node: Any) -> HardwareSettings:
        known = {f.name for f in fields(cls)}
        values = dict(node or {})
        unknown = sorted(set(values) - known)
        if unknown:
            raise BdrunError(
                f"unknown trainer setting {unknown[0]!r}; known: {', '.join(sorted(known))}"
            )
        missing = sorted(known - set(values))
        if missing:
            raise BdrunError(
                f"trainer.{missing[0]} has no value; set it, e.g. trainer.{missing[0]}=..."
            )
        settings = cls(**values)
        if settings.loop not in LOOPS:
            raise BdrunError(f"trainer.loop={settings.loop!r} must be one of {', '.join(LOOPS)}")
        if settings.loop == "plain" and not settings.plain_loop_fits():
            raise BdrunError(
                "trainer.loop=plain trains in one process on the CPU in full precision only "
                f"(this trainer: accelerator {settings.accelerator}, devices {settings.devices}, "
                f"strategy {settings.strategy}, precision {settings.precision}); "
                "use trainer.loop=auto"
            )
        return settings

    def plain_loop_fits(self) -> bool:
        """Whether the plain loop can run this training: one process on the CPU (accelerator
        cpu, or auto without a GPU), one device, no distributed strategy, full precision."""
        on_cpu = self.accelerator == "cpu" or (
            self.accelerator == "auto" and not torch.cuda.is_available()
        )
        return (
            on_cpu
            and str(self.devices) in ("1", "auto")
            and str(self.strategy) in ("auto", "single_device")
            and self.precision in PLAIN_PRECISIONS
        )

    def uses_lightning(self) -> bool:
        """Whether trainings run in Lightning's loop (`loop`, see the class docstring)."""
        return self.loop == "lightning" or not self.plain_loop_fits()

    def device(self) -> torch.device:
        """The device that evaluation and defenses use in this process."""
        if self.accelerator in ("gpu", "cuda") or (
            self.accelerator == "auto" and torch.cuda.is_available()
        ):
            if not torch.cuda.is_available():
                raise BdrunError("trainer=gpu but no CUDA device is visible; use trainer=cpu")
            return torch.device("cuda")
        return torch.device("cpu")

    def show_progress(self) -> bool:
        return progress_enabled(self.progress)

    def keeps_data_on_device(self, data: ImageSet) -> bool:
        """Whether a GPU training should hold `data` in GPU memory (see data_on_device)."""
        if str(self.data_on_device).lower() == "auto":
            return data.x.nbytes + data.y.nbytes <= DATA_ON_DEVICE_AUTO_BYTES
        return bool(self.data_on_device)


def train_settings(**changes: Any) -> TrainSettings:
    """conf/config.yaml's `train` values with `changes`, for code that trains outside a run
    (tests, benchmarks, notebooks)."""
    from omegaconf import OmegaConf

    from bdrun.tuning import CONF_DIR

    values = OmegaConf.to_container(OmegaConf.load(CONF_DIR / "config.yaml").train)
    return TrainSettings.from_config({**values, **changes})


def hardware_settings(trainer: str = "cpu", **changes: Any) -> HardwareSettings:
    """conf/trainer/<trainer>.yaml's values with `changes` (see train_settings)."""
    from omegaconf import OmegaConf

    from bdrun.tuning import CONF_DIR

    values = OmegaConf.to_container(OmegaConf.load(CONF_DIR / "trainer" / f"{trainer}.yaml"))
    return HardwareSettings.from_config({**values, **changes})


class Trainee(Protocol):
    """What a TrainingHook sees of the training that calls it, in either loop: the model being
    trained, its data and settings, the device, and `trainer` with `world_size`, `optimizers`
    (the classifier's optimizer first) and `should_stop` (set it to end the training after the
    current epoch)."""

    model: nn.Module
    data: ImageSet
    settings: TrainSettings
    trainer: Any

    @property
    def device(self) -> torch.device: ...


class TrainingHook:
    """Base for code that acts inside the training loop; every method is optional.

    `resumable`: True when the hook keeps no state of its own across epochs (no generator,
    counters or modules it trains), so an interrupted training may resume from a checkpoint of
    the classifier alone; a training with any non-resumable hook restarts from scratch.
    """

    resumable = False

    def on_batch(self, x: Tensor, y: Tensor, pos: Tensor, module: Trainee) -> tuple[Tensor, Tensor]:
        """Rewrite a float batch (pos = rows of the training set) before the forward pass."""
        return x, y

    def loss(self, logits: Tensor, y: Tensor, pos: Tensor, module: Trainee) -> Tensor | None:
        """A replacement loss for this batch, or None for cross-entropy."""
        return None

    def on_epoch_end(self, module: Trainee) -> None:
        """Called after every training epoch."""

    def on_train_start(self, module: Trainee) -> None:
        """Called before the first batch of every training run (reset per-run state here)."""

    def on_after_backward(self, module: Trainee) -> None:
        """Called after the loss's backward pass, before the optimizer step (step the hook's own
        optimizer here, or replace the gradients: FT-SAM's second pass)."""

    def on_after_step(self, module: Trainee) -> None:
        """Called after every optimizer step (project weights back onto a constraint here:
        FST's head norm)."""

    def modules(self) -> dict[str, nn.Module]:
        """Modules this hook trains along with the classifier (input-aware's trigger generator).

        The model cache stores them in the classifier's entry and loads them back on a hit.
        """
        return {}


def optimizer_and_scheduler(
    params: Any, s: TrainSettings
) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LRScheduler | None]:
    """The optimizer of train.optimizer and the per-epoch scheduler of train.scheduler (None
    for `none`). SGD uses Nesterov momentum whenever momentum > 0."""
    if s.optimizer == "sgd":
        opt: torch.optim.Optimizer = torch.optim.SGD(
            params,
            lr=s.lr,
            momentum=s.momentum,
            weight_decay=s.weight_decay,
            nesterov=s.momentum > 0,
        )
    elif s.optimizer == "adam":
        opt = torch.optim.Adam(params, lr=s.lr, weight_decay=s.weight_decay)
    elif s.optimizer == "radam":  # Narcissus' warm-up (the authors' RAdam)
        opt = torch.optim.RAdam(params, lr=s.lr, weight_decay=s.weight_decay)
    else:
        opt = torch.optim.AdamW(params, lr=s.lr, weight_decay=s.weight_decay)
    epochs = max(s.epochs, 1)
    if s.scheduler == "cosine":
        return opt, torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=epochs)
    if s.scheduler == "step":
        milestones = [epochs // 2, 3 * epochs // 4]
        return opt, torch.optim.lr_scheduler.MultiStepLR(opt, milestones=milestones, gamma=0.1)
    return opt, None


def step_loss(
    trainee: Trainee, hooks: list[TrainingHook], batch: tuple[Tensor, Tensor, Tensor]
) -> tuple[Tensor, Tensor]:
    """One training step's forward pass: the hooks rewrite the float batch, the first hook
    with a loss of its own replaces cross-entropy. Returns the loss and the step's sums
    (loss x samples, correct predictions, samples) as one tensor on the device, for the
    epoch's figures without a read-back per step."""
    x, y, pos = batch
    for hook in hooks:
        x, y = hook.on_batch(x, y, pos, trainee)
    logits = trainee.model(x)
    loss = None
    for hook in hooks:
        loss = hook.loss(logits, y, pos, trainee)
        if loss is not None:
            break
    if loss is None:
        loss = F.cross_entropy(logits, y, label_smoothing=trainee.settings.label_smoothing)
    with torch.no_grad():
        loss_sum = loss.detach().float() * len(y)
        sums = torch.stack([loss_sum, (logits.argmax(1) == y).sum(), loss_sum.new_tensor(len(y))])
    return loss, sums


def trained_weights(model: nn.Module, hooks: list[TrainingHook]) -> list[Tensor]:
    """What an epoch end checks for NaN / inf: the model's state and the parameters of the
    modules the hooks train (not their buffers: records that start at -inf, like ABL's worst
    loss so far, or NaN before a first value)."""
    weights = list(model.state_dict().values())
    for hook in hooks:
        weights += [p for module in hook.modules().values() for p in module.parameters()]
    return weights


def stage_name(stream: str) -> str:
    """What a training of `stream` is, as a divergence message names it."""
    return "the poisoned model's training" if stream == "train" else f"training stream {stream!r}"


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
    """Train `model` in place on `data` and return it on the CPU in eval mode, in the loop
    `hardware` asks for (HardwareSettings.uses_lightning); both share these semantics:

    - The global RNG (model dropout, cuDNN) is seeded from (seed, stream) for the duration, so
      the same seed gives the same weights on CPU.
    - `logger`: the run's RunLogger (or None); it receives train/loss and train/acc per epoch.
    - `checkpoint_dir`: where to keep a checkpoint of the last finished epoch; a training that
      finds one there (an earlier run was killed or got SIGTERM) resumes from it. Ignored when
      a hook is not `resumable`. On SIGTERM the training stops after the current batch and
      raises TrainingInterrupted.
    - A loss or weights that stop being finite end the training at that epoch's end with
      TrainingDiverged (naming `stream`'s stage, the epoch and train.lr); its checkpoint is
      removed, as resuming would diverge again.
    """
    if hardware.uses_lightning():
        from bdrun.lightning_loop import fit as loop_fit
    else:
        from bdrun.plain_loop import fit as loop_fit
    return loop_fit(
        model,
        data,
        settings,
        hardware,
        seed,
        hooks=hooks,
        logger=logger,
        stream=stream,
        checkpoint_dir=checkpoint_dir,
    )


@contextmanager
def torch_threads(count: int | None) -> Iterator[None]:
    """torch's thread count set to `count` (None or 0: unchanged) for the duration, so a run
    with trainer.num_threads leaves the runs after it in the same process (sweep jobs of the
    basic launcher, tests) as it found them; CPU results depend on the thread count."""
    before = torch.get_num_threads()
    if count:
        torch.set_num_threads(int(count))
    try:
        yield
    finally:
        torch.set_num_threads(before)


CHECKPOINT_FILE = "last.ckpt"
# the key that tells which loop wrote a checkpoint: both keep theirs under the same cache key
PLAIN_CHECKPOINT = "bdrun_plain_loop"
LIGHTNING_CHECKPOINT = "pytorch-lightning_version"


def last_checkpoint(folder: Path, written_by: str) -> Path | None:
    """The checkpoint in `folder` if it loads as plain tensors and containers (we wrote it;
    weights_only keeps even a tampered file from running code) and holds the key `written_by`
    (PLAIN_CHECKPOINT or LIGHTNING_CHECKPOINT: the loop that reads it wrote it), else None (and
    it is removed: the training starts over)."""
    path = folder / CHECKPOINT_FILE
    if not path.is_file():
        return None
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
        if not isinstance(state, dict) or written_by not in state:
            raise ValueError("written by the other training loop")
    except Exception as err:  # truncated or foreign: train from scratch
        logging.getLogger(__name__).warning("ignoring unreadable checkpoint %s: %s", path, err)
        path.unlink(missing_ok=True)
        return None
    return path
