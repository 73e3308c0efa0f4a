"""Where input-aware's attack succeeds: ASR by each test input's mask area and by true class.

.venv/bin/python benchmarks/input_aware_masks.py [OVERRIDE ...]

Composes `dataset=fashion_mnist attack=input_aware logger=none` plus the overrides (for example
attack.mask_epochs=3 train.epochs=12), trains or loads the poisoned model through the model
cache ($BDRUN_CACHE, as a `bdrun` run with the same settings would), and prints the ASR of the
non-target test inputs split into fifths by the area of their generated mask, then per class.
Measured 2026-11-23 (CPU, `attack.mask_epochs=3 train.epochs=12`): ASR 78.5 % (the run's own),
from 52.8 % in the smallest-mask fifth (< 0.9 % of the pixels) to 89.3 % in the largest
(1.4-2.7 %); sandals 56.8 %, trousers 91.8 %.
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

import torch
from hydra import compose, initialize_config_dir

from bdrun.attacks.generators import TriggerNet
from bdrun.attacks.input_aware import stamp_generated
from bdrun.cli import CONF_DIR
from bdrun.data.base import to_float
from bdrun.metrics import predict
from bdrun.runner import prepare


def main(overrides: list[str]) -> None:
    with initialize_config_dir(version_base=None, config_dir=CONF_DIR):
        cfg = compose(
            "config",
            overrides=["dataset=fashion_mnist", "attack=input_aware", "logger=none", *overrides],
        )
    with tempfile.TemporaryDirectory() as run_dir:
        prepared = prepare(cfg, Path(run_dir))  # trains (or loads) the model and its generators
        model, attack, test = prepared.model, prepared.attack, prepared.data.test
    patterns, masks = attack.generators()
    test = test.subset(test.y != attack.target)
    x = to_float(test.x)
    with torch.no_grad():
        area = TriggerNet.threshold(masks(x)).flatten(1).mean(1)
        hit = predict(model, stamp_generated(x, x, patterns, masks)) == attack.target
    print(f"ASR {hit.float().mean():.4f}, mean mask area {area.mean():.4f}")
    edges = area.quantile(torch.linspace(0, 1, 6))
    for low, high in zip(edges[:-1], edges[1:], strict=True):
        rows = (area >= low) & (area <= high)
        print(f"mask area {low:.4f}-{high:.4f}: ASR {hit[rows].float().mean():.3f}")
    for label in test.y.unique().tolist():
        rows = test.y == label
        print(f"class {label}: ASR {hit[rows].float().mean():.3f}, area {area[rows].mean():.4f}")


if __name__ == "__main__":
    main(sys.argv[1:])
