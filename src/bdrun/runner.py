"""The experiment pipeline as plain functions:

seed -> clean data (train / test / clean holdout)
     -> attack stage: attack.fit, attack.poison(train), the poisoned model (trained through the
        cache, or supplied by the attack), attack.backdoor_test(test)  => frozen RunData
     -> "before" metrics
     -> data-inspection defenses -> keep mask -> retrain on the kept data
     -> training-time defenses -> model-repair defenses -> run-time detectors
     -> "after" metrics -> results.json
Defenses get the model and the frozen data as arguments, plus a context of tools.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf
from torch import Tensor, nn

from bdrun import __version__
from bdrun.attacks.base import Attack
from bdrun.cache import ModelCache
from bdrun.config import build, component_name
from bdrun.context import Guard, RunContext, Scorer
from bdrun.data.base import ImageSet
from bdrun.data.splits import Splits, load_splits
from bdrun.defenses.base import Carried, Defense
from bdrun.errors import BdrunError
from bdrun.export import ExportSettings, export_run
from bdrun.loggers import make_logger
from bdrun.metrics import input_detection_metrics, per_class_rows, removal_metrics
from bdrun.models.base import check_fits
from bdrun.results import RESULTS_FILE, version_string, write_json_atomic
from bdrun.rng import seeded_global
from bdrun.state import RunData
from bdrun.training import HardwareSettings, TrainSettings, run_seed, torch_threads
from bdrun.tuning import STACK_KEY, applied_tuning

log = logging.getLogger(__name__)


def cache_settings(node: Any) -> tuple[bool, bool, str]:
    """(enabled, refresh, dir) from `cache`, which may be a mapping or plain true/false."""
    if isinstance(node, bool):
        return node, False, "~/.cache/bdrun/models"
    node = node or {}
    return (
        bool(node.get("enabled", True)),
        bool(node.get("refresh", False)),
        str(node.get("dir", "~/.cache/bdrun/models")),
    )


def build_defenses(cfg: DictConfig) -> list[Defense]:
    """The configured defense, followed by any stacked ones, in order."""
    nodes = [cfg.defense, *(cfg.get(STACK_KEY) or {}).values()]
    defenses = []
    for node in nodes:
        defense = build(node, "defense")
        defense.name = component_name(node, type(defense).__name__.lower())
        defenses.append(defense)
    return defenses


@dataclass(frozen=True)
class Setup:
    """Everything the config builds before the attack stage: the run's tools (no scorer yet),
    the clean splits, the attack (set up for the data) and the defenses."""

    ctx: RunContext
    splits: Splits
    attack: Attack
    defenses: list[Defense]
    names: dict[str, str]
    export: ExportSettings


@dataclass(frozen=True)
class Prepared:
    """A run after its attack stage: the tools (with a scorer), the frozen data, the poisoned
    model (trained or loaded) and the defenses still to act."""

    ctx: RunContext
    data: RunData
    model: nn.Module
    model_status: str  # "hit" | "miss" | "off" (the model cache) or "pretrained"
    train_s: float
    attack: Attack
    clean_train: ImageSet
    defenses: list[Defense]
    names: dict[str, str]
    export: ExportSettings


def poison_stage(attack: Attack, splits: Splits, ctx: RunContext) -> ImageSet:
    """Fit the attack on the clean data and return the poisoned training set."""
    # the attack's own models (surrogates) train without its hooks: they model clean data
    attack.fit(splits.train, splits.test, dataclasses.replace(ctx, attack_hooks=()))
    return attack.poison(splits.train, ctx.generator("poison"))


def attack_stage(
    attack: Attack, splits: Splits, ctx: RunContext
) -> tuple[RunData, nn.Module, str, float]:
    """The poison stage, then the poisoned model (from the attack, or trained through the
    cache) and the backdoor test set; return the frozen data, the model, its cache status and
    the seconds it took to get it."""
    poisoned = poison_stage(attack, splits, ctx)
    started = time.perf_counter()
    model = attack.pretrained(poisoned, ctx)
    if model is not None:
        model, status = model.eval(), "pretrained"
    else:
        model, status = ctx.train_cached(poisoned)
    train_s = time.perf_counter() - started
    # a trigger learned with the model (input-aware) exists only now, cache hit or not
    attack.after_training(splits.test, ctx)
    data = RunData(
        info=splits.info,
        train=poisoned,
        holdout=splits.holdout,
        test=splits.test,
        backdoor_test=attack.backdoor_test(splits.test),
        cover=attack.cover,
    )
    return data, model, status, train_s


def scorer_for(attack: Attack, data: RunData, ctx: RunContext) -> Scorer:
    """The scorer over the run's frozen test sets, with the attack's own figures bound in."""
    return Scorer(
        test=data.test,
        backdoor_test=data.backdoor_test,
        num_classes=data.info.num_classes,
        batch_size=ctx.settings.eval_batch_size,
        device=ctx.device,
        extra=lambda predict_fn: attack.evaluate(predict_fn, data, ctx),
    )


def setup(cfg: DictConfig, run_dir: Path) -> Setup:
    """Load the data and build the attack, the model factory, the defenses and the tools."""
    seed = run_seed(cfg.seed)
    settings = TrainSettings.from_config(OmegaConf.to_container(cfg.train, resolve=True))
    hardware = HardwareSettings.from_config(OmegaConf.to_container(cfg.trainer, resolve=True))
    hardware.device()  # fail early when trainer=gpu has no GPU
    if hardware.num_threads:  # before any attack or defense computes (PGD, surrogates, ...);
        torch.set_num_threads(hardware.num_threads)  # run() restores the count afterwards

    splits = load_splits(cfg.dataset, seed)
    info = splits.info
    attack: Attack = build(cfg.attack, "attack")
    attack.setup(info, seed)

    model_name = component_name(cfg.model, "model")

    def new_model() -> torch.nn.Module:
        with seeded_global(seed, "init"):
            return build(
                cfg.model,
                "model",
                in_shape=info.shape,
                num_classes=info.num_classes,
                mean=info.mean,
                std=info.std,
            )

    check_fits(new_model(), model_name, info.shape, info.num_classes)
    defenses = build_defenses(cfg)

    enabled, refresh, cache_dir = cache_settings(cfg.get("cache"))
    config = OmegaConf.to_container(cfg, resolve=True)
    logger = make_logger(cfg.get("logger"), run_dir, config)
    hooks = attack.training_hooks()
    key_parts = {
        "model": OmegaConf.to_container(cfg.model, resolve=True),
        "normalize": [info.mean, info.std],
        "hardware": {
            k: getattr(hardware, k) for k in ("accelerator", "devices", "strategy", "precision")
        },
        # CPU results depend on the thread count: a model trained on two threads is not the
        # one-thread run's model
        "threads": torch.get_num_threads(),
        "seed": seed,
        "version": __version__,
        # a training-time attack poisons inside the loop, so the tensors alone do not determine it
        "attack": OmegaConf.to_container(cfg.attack, resolve=True) if hooks else None,
    }
    tools = RunContext(
        seed=seed,
        info=info,
        settings=settings,
        hardware=hardware,
        run_dir=run_dir,
        logger=logger,
        cache=ModelCache(cache_dir, enabled, refresh),
        new_model=new_model,
        key_parts=key_parts,
        attack_hooks=hooks,
    )
    names = {
        "dataset": info.name,
        "model": model_name,
        "attack": component_name(cfg.attack, "attack"),
        "defense": "+".join(d.name for d in defenses),
    }
    return Setup(
        tools, splits, attack, defenses, names, ExportSettings.from_config(cfg, names, seed)
    )


def prepare(cfg: DictConfig, run_dir: Path) -> Prepared:
    """`setup`, then the attack stage; the returned context scores on the frozen test sets."""
    built = setup(cfg, run_dir)
    tools, attack = built.ctx, built.attack
    try:
        data, model, status, train_s = attack_stage(attack, built.splits, tools)
    except BaseException:
        tools.logger.finish(failed=True)
        raise
    ctx = tools.with_scorer(scorer_for(attack, data, tools))
    return Prepared(
        ctx,
        data,
        model,
        status,
        train_s,
        attack,
        built.splits.train,
        built.defenses,
        built.names,
        built.export,
    )


@dataclass(frozen=True)
class Defended:
    """What the defense stages leave: the model after them, the detectors guarding it (measured
    on the test sets) and the figures for `metrics.detection`."""

    model: nn.Module
    guards: list[Guard]
    detection: dict[str, Any]


def run_defenses(
    defenses: list[Defense], model: nn.Module, data: RunData, ctx: RunContext
) -> Defended:
    """Every stage of every defense, in pipeline order (bdrun.defenses.base), on `model` (the
    poisoned model). The runner scores what the stages return against the ground truth:
    removals and set-apart samples (precision, recall, removed), verdicts (the model-inspection
    keys) and detectors (measured once on the test sets: the input-detection keys, plus the
    detector's own `describe` figures). Each defense's figures are its scored keys and what it
    recorded (`ctx.record`); with several defenses they are also kept per defense name."""
    contexts = [ctx.for_defense() for _ in defenses]
    scored: list[dict[str, Any]] = [{} for _ in defenses]
    carried = [Carried() for _ in defenses]
    everyone = list(zip(defenses, contexts, scored, strict=True))

    keep = None
    for defense, own, figures in everyone:
        mask = defense.inspect_data(model, data, own)
        if mask is not None:
            mask = check_mask(mask, len(data.train), f"{defense.name}'s keep mask")
            table = f"{defense.name}/per_class"
            figures.update(score_removal(~mask, data.train, table, ctx, data.cover))
            keep = mask if keep is None else keep & mask
    training_data = data.train if keep is None else data.train.subset(keep)
    current = model
    if keep is not None:
        current, _ = ctx.train_cached(training_data, stream="train-filtered")
    for defense, own, figures in everyone:
        trained = defense.train(training_data, data, own)
        if trained is not None:
            current = trained.model
            if trained.set_apart is not None:
                set_apart = check_mask(trained.set_apart, len(training_data), defense.name)
                cover = data.cover
                if cover is not None and keep is not None:
                    cover = cover[keep]
                figures.update(score_removal(set_apart, training_data, None, ctx, cover))
    for i, (defense, own, figures) in enumerate(everyone):
        verdict = defense.inspect_model(current, data, own)
        if verdict is not None:
            carried[i] = Carried(verdict=verdict)
            figures.update(verdict.metrics())
    for i, (defense, own, _) in enumerate(everyone):
        carried[i] = dataclasses.replace(carried[i], unrepaired=current)
        current = defense.repair(current, data, own, carried[i])
    guards = []
    for i, (defense, own, figures) in enumerate(everyone):
        detector = defense.detector(current, data, own, carried[i])
        if detector is not None:
            guard = ctx.scorer_or_fail().guard(detector)
            figures.update(
                input_detection_metrics(
                    guard.clean.scores, guard.backdoor.scores, detector.threshold
                )
            )
            figures.update(detector.describe(guard.clean, guard.backdoor, own))
            guards.append(guard)
    return Defended(current, guards, detection_figures(defenses, scored, contexts))


def check_mask(mask: Tensor, size: int, what: str) -> Tensor:
    """A stage's bool mask over `size` samples, or a RuntimeError (a defense's bug)."""
    if mask.dtype != torch.bool or mask.shape != (size,):
        raise RuntimeError(f"{what} must be a bool tensor of shape ({size},), got {mask.shape}")
    return mask


def score_removal(
    removed: Tensor,
    data: ImageSet,
    table: str | None,
    ctx: RunContext,
    cover: Tensor | None = None,
) -> dict:
    """Precision, recall and count of the removed samples against the poison ground truth; the
    per-label breakdown goes to the logger as `table`. Where the attack made cover samples
    (trigger, true label), they count as clean and `cover_removed` says how many went."""
    if table:
        ctx.logger.log_table(table, *per_class_rows(data.y, removed, data.poison))
    figures = removal_metrics(removed, data.poison)
    if cover is not None:
        figures["cover_removed"] = int((removed & cover).sum())
    return figures


def detection_figures(
    defenses: list[Defense], scored: list[dict[str, Any]], contexts: list[RunContext]
) -> dict[str, Any]:
    """metrics.detection: every defense's scored keys and recorded figures, in stack order (a
    later defense's key replaces an earlier one's; warnings add up); with several defenses
    that report anything, each one's figures also under by_defense.<name>."""
    detection: dict[str, Any] = {}
    warnings: list[str] = []
    per_defense = {}
    for defense, own_scored, own in zip(defenses, scored, contexts, strict=True):
        figures = {**own_scored, **own.figures}
        warnings += figures.pop("warnings", [])
        detection.update(figures)
        if figures:
            per_defense[defense.name] = figures
    if len(per_defense) > 1:
        detection["by_defense"] = per_defense
    if warnings:
        detection["warnings"] = warnings
    return detection


def run(
    cfg: DictConfig, run_dir: Path, keep_model: Callable[[nn.Module], None] | None = None
) -> dict[str, Any]:
    """Run one experiment and write results.json into run_dir; return the results.

    `keep_model` is given the poisoned model once the attack stage has it (a population job
    saves its weights there)."""
    with torch_threads(None):  # trainer.num_threads holds for this run only
        return _run(cfg, run_dir, keep_model)


def _run(
    cfg: DictConfig, run_dir: Path, keep_model: Callable[[nn.Module], None] | None = None
) -> dict[str, Any]:
    started = time.perf_counter()
    tuning = applied_tuning(cfg)  # a config composed without bdrun's tuning step fails here
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    prepared = prepare(cfg, run_dir)
    ctx, data = prepared.ctx, prepared.data
    model_before = prepared.model
    failed = True
    try:
        if keep_model is not None:
            keep_model(model_before)
        before = ctx.evaluate(model_before)
        log.info("before defense: %s", before)
        defense_started = time.perf_counter()
        defended = run_defenses(prepared.defenses, model_before, data, ctx)
        unchanged = defended.model is model_before and not defended.guards
        after = (
            dict(before)
            if unchanged
            else ctx.scorer_or_fail().evaluate(defended.model, defended.guards)
        )
        defense_s = time.perf_counter() - defense_started
        metrics: dict[str, Any] = {"before": before, "after": after}
        if defended.detection:
            metrics["detection"] = defended.detection
        results = {
            **prepared.names,
            "seed": ctx.seed,
            "metrics": metrics,
            "timing": {
                "train_s": prepared.train_s,
                "defense_s": defense_s,
                "total_s": time.perf_counter() - started,
            },
            "cache": {"model": prepared.model_status},
            "tuning": tuning,
            "poison": {
                "train_poisoned": int(data.train.poison.sum()),
                **({"train_cover": int(data.cover.sum())} if data.cover is not None else {}),
                "train_size": len(data.train),
                "backdoor_test_size": len(data.backdoor_test),
            },
            "config": OmegaConf.to_container(cfg, resolve=True),
            "version": version_string(),
        }
        # the repaired model / GoodNet as folders bdrun-eval runs (see bdrun.export)
        artifacts = export_run(
            prepared.export,
            run_dir,
            model_before,
            defended.model,
            [guard.detector for guard in defended.guards],
        )
        if artifacts:
            results["artifacts"] = artifacts
        write_json_atomic(run_dir / RESULTS_FILE, results)
        ctx.logger.log_metrics(
            {
                f"{stage}/{k}": v
                for stage in ("before", "after")
                for k, v in metrics[stage].items()
                if isinstance(v, int | float)
            }
        )
        failed = False
        return results
    finally:
        ctx.logger.finish(failed=failed)


__all__ = ["BdrunError", "run", "run_defenses"]
