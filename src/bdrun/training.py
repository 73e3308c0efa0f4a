"""Training settings, hooks and checkpoints. Training itself (a LightningModule around a plain
nn.Module, fed by the in-memory loader) is `bdrun.lightning_loop.fit`, imported where a model is
trained, so runs that train nothing never import Lightning.

Training-time attacks and defenses plug in as TrainingHooks: they may rewrite each batch
(WaNet, input-aware triggers) or the loss (ABL), and see every epoch end.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

from bdrun.data.base import ImageSet
from bdrun.errors import BdrunError
from bdrun.progress import enabled as progress_enabled
from bdrun.validate import coerce

if TYPE_CHECKING:
    from bdrun.lightning_loop import ClassifierModule

OPTIMIZERS = ("sgd", "adam", "adamw")
SCHEDULERS = ("cosine", "step", "none")


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
        return cls(**values)

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


class TrainingHook:
    """Base for code that acts inside the training loop; every method is optional.

    `resumable`: True when the hook keeps no state of its own across epochs (no generator,
    counters or modules it trains), so an interrupted training may resume from a checkpoint of
    the classifier alone; a training with any non-resumable hook restarts from scratch.
    """

    resumable = False

    def on_batch(
        self, x: Tensor, y: Tensor, pos: Tensor, module: ClassifierModule
    ) -> tuple[Tensor, Tensor]:
        """Rewrite a float batch (pos = rows of the training set) before the forward pass."""
        return x, y

    def loss(
        self, logits: Tensor, y: Tensor, pos: Tensor, module: ClassifierModule
    ) -> Tensor | None:
        """A replacement loss for this batch, or None for cross-entropy."""
        return None

    def on_epoch_end(self, module: ClassifierModule) -> None:
        """Called after every training epoch."""

    def on_train_start(self, module: ClassifierModule) -> None:
        """Called before the first batch of every training run (reset per-run state here)."""

    def on_after_backward(self, module: ClassifierModule) -> None:
        """Called after the loss's backward pass (step the hook's own optimizer here)."""

    def modules(self) -> dict[str, nn.Module]:
        """Modules this hook trains along with the classifier (input-aware's trigger generator).

        The model cache stores them in the classifier's entry and loads them back on a hit.
        """
        return {}


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


def last_checkpoint(folder: Path) -> Path | None:
    """The checkpoint in `folder` if it loads as plain tensors and containers (we wrote it;
    weights_only keeps even a tampered file from running code), else None (and it is removed)."""
    path = folder / CHECKPOINT_FILE
    if not path.is_file():
        return None
    try:
        torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # truncated or foreign: train from scratch
        logging.getLogger(__name__).warning("ignoring unreadable checkpoint %s: %s", path, err)
        path.unlink(missing_ok=True)
        return None
    return path
