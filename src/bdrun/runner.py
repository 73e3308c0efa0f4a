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
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf
from torch import nn

from bdrun import __version__
from bdrun.attacks.base import Attack
from bdrun.cache import ModelCache
from bdrun.config import build, component_name
from bdrun.context import RunContext, Scorer
from bdrun.data.base import ImageSet
from bdrun.data.splits import Splits, load_splits
from bdrun.defenses.base import Defense
from bdrun.errors import BdrunError
from bdrun.export import export_run
from bdrun.loggers import make_logger
from bdrun.models.base import check_fits
from bdrun.results import RESULTS_FILE, version_string, write_json_atomic
from bdrun.rng import seeded_global
from bdrun.state import RunData
from bdrun.training import HardwareSettings, TrainSettings, run_seed, torch_threads
from bdrun.tuning import applied_tuning

log = logging.getLogger(__name__)

STACK_KEY = "defense_stack"  # extra defenses of `defense=[a,b]` (see bdrun.cli)


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
    return Setup(tools, splits, attack, defenses, names)


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
    )


def run(cfg: DictConfig, run_dir: Path) -> dict[str, Any]:
    """Run one experiment and write results.json into run_dir; return the results."""
    with torch_threads(None):  # trainer.num_threads holds for this run only
        return _run(cfg, run_dir)


def _run(cfg: DictConfig, run_dir: Path) -> dict[str, Any]:
    started = time.perf_counter()
    applied_tuning(cfg)  # a config composed without bdrun's tuning step fails here, not at the end
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    prepared = prepare(cfg, run_dir)
    ctx, data, defenses = prepared.ctx, prepared.data, prepared.defenses
    model_before = prepared.model
    failed = True
    try:
        before = ctx.evaluate(model_before)
        log.info("before defense: %s", before)

        defense_started = time.perf_counter()
        keep = None
        for defense in defenses:
            mask = defense.inspect_data(model_before, data, ctx)
            if mask is not None:
                keep = mask if keep is None else keep & mask
        training_data = data.train if keep is None else data.train.subset(keep)
        model_after = model_before
        if keep is not None:
            model_after, _ = ctx.train_cached(training_data, stream="train-filtered")
        for defense in defenses:
            trained = defense.train(training_data, data, ctx)
            if trained is not None:
                model_after = trained
        for defense in defenses:
            model_after = defense.repair(model_after, data, ctx)
        detectors = [
            d
            for d in (defense.detector(model_after, data, ctx) for defense in defenses)
            if d is not None
        ]
        unchanged = model_after is model_before and not detectors
        after = dict(before) if unchanged else ctx.evaluate(model_after, detectors)
        train_s = prepared.train_s
        defense_s = time.perf_counter() - defense_started

        detection: dict[str, Any] = {}
        for defense in defenses:
            detection.update(defense.report())
        metrics: dict[str, Any] = {"before": before, "after": after}
        if detection:
            metrics["detection"] = detection
        results = {
            **prepared.names,
            "seed": ctx.seed,
            "metrics": metrics,
            "timing": {
                "train_s": train_s,
                "defense_s": defense_s,
                "total_s": time.perf_counter() - started,
            },
            "cache": {"model": prepared.model_status},
            "tuning": applied_tuning(cfg),
            "poison": {
                "train_poisoned": int(data.train.poison.sum()),
                "train_size": len(data.train),
                "backdoor_test_size": len(data.backdoor_test),
            },
            "config": OmegaConf.to_container(cfg, resolve=True),
            "version": version_string(),
        }
        # the repaired model / GoodNet as folders bdrun-eval runs (see bdrun.export)
        artifacts = export_run(cfg, run_dir, model_before, model_after, detectors, prepared.names)
        if artifacts:
            results["artifacts"] = artifacts
        write_json_atomic(run_dir / RESULTS_FILE, results)
        ctx.logger.log_metrics(
            {f"{stage}/{k}": v for stage in ("before", "after") for k, v in metrics[stage].items()}
        )
        failed = False
        return results
    finally:
        ctx.logger.finish(failed=failed)


__all__ = ["BdrunError", "run"]
