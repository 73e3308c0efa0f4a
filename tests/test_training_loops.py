"""The plain loop (the CPU default) and Lightning's loop train to the very same weights: a run's
figures do not depend on trainer.loop. Compared on whole runs, whose every trained model (the
poisoned one, the defenses' ones, the modules hooks train) lands in the model cache under a key
that leaves the loop out."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from bdrun.errors import BdrunError
from bdrun.runner import run
from bdrun.training import hardware_settings

from conftest import compose_config


def cached_weights(cache: Path) -> dict[str, dict[str, torch.Tensor]]:
    """Every stored model of the cache, by entry and file."""
    return {
        f"{entry.name}/{file.name}": load_file(file)
        for entry in sorted((cache / "models").iterdir())
        if not entry.name.startswith(".")
        for file in sorted(entry.glob("*.safetensors"))
    }


def run_with(loop: str, tmp_path: Path, *overrides: str) -> tuple[dict, dict]:
    cache = tmp_path / loop / "cache"
    cfg = compose_config(
        "debug=smoke",
        "logger=none",
        f"cache.dir={cache / 'models'}",
        f"trainer.loop={loop}",
        *overrides,
    )
    results = run(cfg, tmp_path / loop / "run")
    return results["metrics"], cached_weights(cache)


def assert_same_training(tmp_path: Path, *overrides: str) -> None:
    plain_metrics, plain = run_with("plain", tmp_path, *overrides)
    lightning_metrics, lightning = run_with("lightning", tmp_path, *overrides)
    assert plain and plain.keys() == lightning.keys()
    for name, weights in plain.items():
        assert weights.keys() == lightning[name].keys(), name
        for tensor, value in weights.items():
            assert torch.equal(value, lightning[name][tensor]), f"{name}: {tensor}"
    assert json.dumps(plain_metrics, sort_keys=True) == json.dumps(
        lightning_metrics, sort_keys=True
    )


def test_badnets_trains_to_the_same_weights_in_both_loops(tmp_path):
    assert_same_training(tmp_path)


@pytest.mark.parametrize(
    "overrides",
    [
        ("attack=wanet",),  # rewrites batches with its own generator
        ("attack=input_aware",),  # trains its generator along, steps it after backward
        ("attack=blind",),  # its loss takes gradients of two losses inside the step (MGDA)
        ("attack=bpp",),  # negative samples from residuals squeezed at the training's start
        ("defense=abl",),  # replaces the loss, stops early, unlearns
        ("defense=nad",),  # distils from a teacher through forward hooks
        ("defense=finetune", "train.optimizer=adam", "train.scheduler=step"),
        ("defense=ft_sam", "model=small_cnn_bn"),  # a second pass after backward
        ("defense=fst", "model=small_cnn_bn"),  # a projection after the optimizer step
    ],
    ids=["wanet", "input_aware", "blind", "bpp", "abl", "nad", "adam-step", "ft_sam", "fst"],
)
def test_hooks_and_optimisers_train_to_the_same_weights_in_both_loops(tmp_path, overrides):
    assert_same_training(tmp_path, *overrides)


def test_the_loop_setting_is_checked():
    assert hardware_settings().uses_lightning() is False
    assert hardware_settings(loop="lightning").uses_lightning() is True
    assert hardware_settings(precision="16-mixed").uses_lightning() is True
    with pytest.raises(BdrunError, match=r"^trainer.loop='fast' must be one of auto, plain"):
        hardware_settings(loop="fast")
    with pytest.raises(BdrunError, match="trainer.loop=plain trains in one process on the CPU"):
        hardware_settings(loop="plain", devices=2)


@pytest.mark.parametrize("loop", ["plain", "lightning"])
def test_both_loops_train_whatever_the_callers_grad_mode(loop):
    from bdrun.data.fake import FakeImages
    from bdrun.models.small_cnn import SmallCNN
    from bdrun.training import fit, train_settings

    data = FakeImages(shape=(1, 8, 8), num_classes=4, n_train=64, n_test=8).load().train
    model = SmallCNN((1, 8, 8), 4, width=8, hidden=16)
    before = [p.detach().clone() for p in model.parameters()]
    with torch.no_grad():  # bdrun-eval's mode, for one
        fit(model, data, train_settings(epochs=1), hardware_settings(loop=loop), seed=0)
    assert any(not torch.equal(a, b) for a, b in zip(before, model.parameters(), strict=True))
