"""The tools every pipeline stage may use: settings, trainer, cache, logger, and a scorer.

A RunContext holds no data and no attack: stages get their models and data as arguments (the
run's data is a frozen `bdrun.state.RunData`). It is frozen; the runner adds the scorer with
`with_scorer` once the attack stage has built the test sets.
"""

from __future__ import annotations

import dataclasses
import shutil
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import torch
from torch import Tensor, nn

from bdrun import __version__
from bdrun.cache import ModelCache, content_key
from bdrun.data.base import DataInfo, ImageSet
from bdrun.loggers import RunLogger
from bdrun.metrics import on_device, predict, prediction_metrics
from bdrun.progress import track
from bdrun.rng import generator
from bdrun.training import HardwareSettings, TrainingHook, TrainSettings, fit

T = TypeVar("T")

if TYPE_CHECKING:
    from bdrun.defenses.base import InputDetector, Measured

PredictFn = Callable[[Tensor], Tensor]


@dataclass(frozen=True)
class Guard:
    """An input detector with its measurement of the run's clean and backdoor test sets: the
    runner measures each detector once and uses the same scores for the detection metrics and
    for the figures of the model behind it."""

    detector: InputDetector
    clean: Measured
    backdoor: Measured

    def rejected(self, measured: Measured) -> Tensor:
        return measured.scores > self.detector.threshold


@dataclass(frozen=True)
class Scorer:
    """Scores a model (behind input detectors) on the run's fixed test sets.

    `extra` maps a prediction function to the attack's own figures (per-trigger ASR, cross-trigger
    accuracy, ...); it is bound to the attack and the data by the runner, so whoever scores never
    touches the attack itself.
    """

    test: ImageSet
    backdoor_test: ImageSet
    num_classes: int
    batch_size: int
    device: torch.device
    extra: Callable[[PredictFn], dict[str, Any]] = field(default=lambda _predict_fn: {})

    def guard(self, detector: InputDetector) -> Guard:
        """`detector` with its scores of the clean and the backdoor test set."""
        return Guard(
            detector, detector.measure(self.test.x), detector.measure(self.backdoor_test.x)
        )

    def predictor(self, model: nn.Module, detectors: Sequence[InputDetector] = ()) -> PredictFn:
        """Images -> predicted labels of `model` behind `detectors`; an input any detector
        rejects gets the label num_classes ("rejected": never correct, never the target)."""

        def predict_fn(x: Tensor) -> Tensor:
            preds = predict(model, x, self.batch_size, self.device)
            if not detectors:
                return preds
            rejected = torch.zeros(len(x), dtype=torch.bool)
            for detector in detectors:
                rejected |= detector.rejects(x).cpu()
            return torch.where(rejected, torch.full_like(preds, self.num_classes), preds)

        return predict_fn

    def evaluate(self, model: nn.Module, guards: Sequence[Guard] = ()) -> dict[str, Any]:
        """CCA, ASR and RA of `model` behind the guarding detectors (an input any of them
        rejects counts as defended, with the scores they measured once), whether the model is
        degenerate (bdrun.metrics.prediction_metrics), plus the attack's own figures. The model
        is held on the scoring device for all the passes, then goes back to where it was."""
        with on_device(model, self.device):
            clean = predict(model, self.test.x, self.batch_size, self.device)
            backdoor = predict(model, self.backdoor_test.x, self.batch_size, self.device)
            for guard in guards:
                clean[guard.rejected(guard.clean)] = self.num_classes
                backdoor[guard.rejected(guard.backdoor)] = self.num_classes
            metrics = prediction_metrics(clean, backdoor, self.test, self.backdoor_test)
            metrics.update(self.extra(self.predictor(model, [g.detector for g in guards])))
            return metrics


@dataclass(frozen=True)
class RunContext:
    """The tools of a run, as attacks and defenses see them (no data, no attack).

    `new_model` builds a freshly initialised model of the configured architecture; `key_parts`
    is what (besides the training tensors) determines a trained model, for the cache;
    `attack_hooks` are the training-time attack's hooks, part of every training of the
    poisoned data; `scorer` scores models on the frozen test sets (None during the attack stage);
    `figures` collects what the stage that runs records (`record`; one dict per defense, see
    `for_defense`).
    """

    seed: int
    info: DataInfo
    settings: TrainSettings
    hardware: HardwareSettings
    run_dir: Path
    logger: RunLogger
    cache: ModelCache
    new_model: Callable[[], nn.Module]
    key_parts: dict[str, Any] = field(default_factory=dict)
    attack_hooks: Sequence[TrainingHook] = ()
    scorer: Scorer | None = None
    figures: dict[str, Any] = field(default_factory=dict)

    def with_scorer(self, scorer: Scorer) -> RunContext:
        """This context with a scorer over the run's test sets (set once they exist)."""
        return dataclasses.replace(self, scorer=scorer)

    def for_defense(self) -> RunContext:
        """This context with an empty `figures` record, for one defense of the run."""
        return dataclasses.replace(self, figures={})

    def record(self, **figures: Any) -> None:
        """Keep figures (plain JSON values) of the stage that runs: a defense's go to
        results.json under metrics.detection. Plots and tables go to `run_dir` / `logger`."""
        self.figures.update(figures)

    @property
    def device(self) -> torch.device:
        return self.hardware.device()

    def generator(self, stream: str) -> torch.Generator:
        """A fresh seeded generator for a named stream of this run."""
        return generator(self.seed, stream)

    def train(
        self,
        data: ImageSet,
        hooks: Sequence[TrainingHook] = (),
        settings: TrainSettings | None = None,
        model: nn.Module | None = None,
        stream: str = "train",
        attack_hooks: bool = True,
        checkpoint_dir: Path | None = None,
    ) -> nn.Module:
        """Train `model` (default: a fresh one) on data with the attack's hooks plus `hooks`.

        `attack_hooks=False` leaves the attack's hooks out: a defender fine-tuning on its clean
        holdout does not run the attacker's training loop."""
        return fit(
            model if model is not None else self.new_model(),
            data,
            settings or self.settings,
            self.hardware,
            self.seed,
            hooks=[*(self.attack_hooks if attack_hooks else ()), *hooks],
            logger=self.logger,
            stream=stream,
            checkpoint_dir=checkpoint_dir,
        )

    def train_cached(
        self,
        data: ImageSet,
        hooks: Sequence[TrainingHook] = (),
        settings: TrainSettings | None = None,
        extra_key: dict[str, Any] | None = None,
        stream: str = "train",
        model: nn.Module | None = None,
        attack_hooks: bool = True,
    ) -> tuple[nn.Module, str]:
        """Like `train`, through the model cache; returns (model, "hit" | "miss" | "off").

        `extra_key` must describe anything else that changes the result (a training-time
        defense's settings, the hooks' configuration, forward hooks on `model`). `model`, if
        given, is trained (or loaded) in place instead of a fresh one; its weights join the key.
        Modules the hooks train along (`TrainingHook.modules()`) are stored in the same entry.
        `attack_hooks=False`: the defender's own training (see `train`).
        """
        settings = settings or self.settings
        used_attack_hooks = self.attack_hooks if attack_hooks else ()
        key = content_key(
            {
                **self.key_parts,
                "x": data.x,
                "y": data.y,
                "train": dataclasses.asdict(settings),
                "extra": extra_key or {},
                "stream": stream,
                **({"init": dict(model.state_dict())} if model is not None else {}),
                # only when off, so the keys of every existing entry stay as they were
                **({} if attack_hooks else {"attack_hooks": False}),
            }
        )
        companions = {
            f"{type(hook).__name__}.{name}": module
            for hook in [*used_attack_hooks, *hooks]
            for name, module in hook.modules().items()
        }
        meta = {
            "key_parts": {k: v for k, v in self.key_parts.items()},
            "extra": extra_key,
            "version": __version__,
        }
        target = model if model is not None else self.new_model()
        # an interrupted training resumes from here when the same run comes again
        checkpoints = self.cache.root / ".checkpoints" / key if self.cache.enabled else None
        trained = self.cache.get_or_train(
            key,
            target,
            lambda: self.train(
                data,
                hooks,
                settings,
                model=target,
                stream=stream,
                attack_hooks=attack_hooks,
                checkpoint_dir=checkpoints,
            ),
            meta,
            companions,
        )
        if checkpoints is not None:
            shutil.rmtree(checkpoints, ignore_errors=True)  # the entry is stored now
        return trained

    def tensor_cached(
        self, what: str, compute: Callable[[], Tensor], inputs: dict[str, Any]
    ) -> tuple[Tensor, str]:
        """A float32 tensor that an attack derives from models and data (an optimised trigger),
        through the cache like a trained model, so every run of a sweep with the same attack
        computes it once: (tensor on the CPU, "hit" | "miss" | "off"). `inputs` must hold all
        that determines it (the model's weights, the images, the settings); the run's key parts
        (seed, threads, model, version) join the key. JSON keeps float32 values exactly."""
        key = content_key({**self.key_parts, "what": what, **inputs})
        values, status = self.cache.get_or_compute(
            key, lambda: compute().detach().cpu().float().tolist(), {"what": what}
        )
        return torch.tensor(values, dtype=torch.float32), status

    def track(
        self, iterable: Iterable[T], description: str, total: int | None = None
    ) -> Iterator[T]:
        """Iterate with a progress bar (quiet in CI / without a terminal; trainer.progress)."""
        return track(iterable, description, total, self.hardware.progress)

    def evaluate(self, model: nn.Module) -> dict[str, Any]:
        """CCA, ASR and RA of `model` on the run's test sets, for figures only (Scorer.evaluate):
        what a defense decides must not depend on them."""
        return self.scorer_or_fail().evaluate(model)

    def scorer_or_fail(self) -> Scorer:
        if self.scorer is None:
            raise RuntimeError("models are scored once the attack stage has built the test sets")
        return self.scorer
