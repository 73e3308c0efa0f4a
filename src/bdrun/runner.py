"""The experiment pipeline as plain functions:

seed -> clean data (train / test / clean holdout)
     -> attack.poison(train), attack.backdoor_test(test)
     -> data-inspection defenses -> keep mask
     -> train the poisoned model (cached) -> "before" metrics
     -> retrain on kept data / training-time defenses -> model-repair defenses
     -> run-time detectors -> "after" metrics -> results.json
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf

from bdrun import __version__
from bdrun.attacks.base import Attack
from bdrun.cache import ModelCache
from bdrun.config import build, component_name
from bdrun.context import RunContext
from bdrun.data.base import ImageSet
from bdrun.data.splits import load_splits
from bdrun.defenses.base import Defense
from bdrun.errors import BdrunError
from bdrun.export import export_run
from bdrun.loggers import make_logger
from bdrun.models.base import check_fits
from bdrun.results import RESULTS_FILE, version_string, write_json_atomic
from bdrun.rng import generator, seeded_global
from bdrun.training import HardwareSettings, TrainSettings, run_seed, torch_threads

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


@dataclass
class Prepared:
    """A run up to (not including) training: context, attack, clean and poisoned training sets."""

    ctx: RunContext
    attack: Attack
    clean_train: ImageSet
    poisoned: ImageSet
    defenses: list[Defense]
    names: dict[str, str]


def prepare(cfg: DictConfig, run_dir: Path) -> Prepared:
    """Load data, build the attack, model factory, defenses and context, and poison the data."""
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
    ctx = RunContext(
        seed=seed,
        info=info,
        train_set=splits.train,
        holdout=splits.holdout,
        test=splits.test,
        backdoor_test=splits.test,  # replaced below, once the attack is fitted
        settings=settings,
        hardware=hardware,
        run_dir=run_dir,
        logger=logger,
        cache=ModelCache(cache_dir, enabled, refresh),
        new_model=new_model,
        key_parts=key_parts,
        attack=attack,
    )
    # the attack's own models (surrogates) train without its hooks: they model clean data
    attack.fit(splits.train, ctx)
    # after fit: a subpopulation, a surrogate-made trigger exist only now
    ctx.backdoor_test = attack.backdoor_test(splits.test)
    poisoned = attack.poison(splits.train, generator(seed, "poison"))
    ctx.train_set = poisoned
    ctx.attack_hooks = hooks
    names = {
        "dataset": info.name,
        "model": model_name,
        "attack": component_name(cfg.attack, "attack"),
        "defense": "+".join(d.name for d in defenses),
    }
    return Prepared(ctx, attack, splits.train, poisoned, defenses, names)


def run(cfg: DictConfig, run_dir: Path) -> dict[str, Any]:
    """Run one experiment and write results.json into run_dir; return the results."""
    with torch_threads(None):  # trainer.num_threads holds for this run only
        return _run(cfg, run_dir)


def _run(cfg: DictConfig, run_dir: Path) -> dict[str, Any]:
    started = time.perf_counter()
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    prepared = prepare(cfg, run_dir)
    ctx, poisoned, defenses, names = (
        prepared.ctx,
        prepared.poisoned,
        prepared.defenses,
        prepared.names,
    )
    failed = True
    try:
        # data inspection; inspectors that need a model use ctx.poisoned_model() (trained once)
        defense_started = time.perf_counter()
        keep = None
        for defense in defenses:
            mask = defense.inspect_data(poisoned, ctx)
            if mask is not None:
                keep = mask if keep is None else keep & mask

        model_before = ctx.poisoned_model()
        scoring_started = time.perf_counter()
        before = ctx.evaluate(model_before)
        before_eval_s = time.perf_counter() - scoring_started
        log.info("before defense: %s", before)

        training_data = poisoned if keep is None else poisoned.subset(keep)
        model_after = model_before
        if keep is not None:
            model_after, _ = ctx.train_cached(training_data, stream="train-filtered")
        for defense in defenses:
            trained = defense.train(training_data, ctx)
            if trained is not None:
                model_after = trained
        for defense in defenses:
            model_after = defense.repair(model_after, ctx)
        detectors = [
            d for d in (defense.detector(model_after, ctx) for defense in defenses) if d is not None
        ]
        unchanged = model_after is model_before and not detectors
        after = dict(before) if unchanged else ctx.evaluate(model_after, detectors)
        train_s = ctx.poisoned_train_s
        defense_s = time.perf_counter() - defense_started - train_s - before_eval_s

        detection: dict[str, Any] = {}
        for defense in defenses:
            detection.update(defense.report())
        metrics: dict[str, Any] = {"before": before, "after": after}
        if detection:
            metrics["detection"] = detection
        results = {
            **names,
            "seed": ctx.seed,
            "metrics": metrics,
            "timing": {
                "train_s": train_s,
                "defense_s": defense_s,
                "total_s": time.perf_counter() - started,
            },
            "cache": {"model": ctx.poisoned_status},
            "poison": {
                "train_poisoned": int(poisoned.poison.sum()),
                "train_size": len(poisoned),
                "backdoor_test_size": len(ctx.backdoor_test),
            },
            "config": OmegaConf.to_container(cfg, resolve=True),
            "version": version_string(),
        }
        # the repaired model / GoodNet as folders bdrun-eval runs (see bdrun.export)
        artifacts = export_run(cfg, run_dir, model_before, model_after, detectors, names)
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
