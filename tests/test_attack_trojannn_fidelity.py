"""TrojanNN on Fashion-MNIST (slow): issue 12's bar, ASR >= 95 % at a CCA drop of at most 3
points against the clean model (`attack=none`), for both masks, with the small CNN's 6 epochs.

Measured (CPU, seed 0, the same runs through bdrun.runner.run): clean CCA 92.07 %; square
ASR 99.99 %, CCA 92.27 %; watermark ASR 99.97 %, CCA 91.59 %.
Needs Debian's dataset-fashion-mnist (or the IDX files under $BDRUN_DATA/fashion_mnist/).
"""

from __future__ import annotations

from pathlib import Path

import pytest

from conftest import needs_fashion_mnist, run_fashion_mnist

pytestmark = [
    pytest.mark.slow,
    needs_fashion_mnist,
]


def fashion_mnist_before(tmp_path: Path, *overrides: str) -> dict[str, float]:
    before = run_fashion_mnist(tmp_path, *overrides)["metrics"]["before"]
    print(overrides, " ".join(f"{k} {v:.4f}" for k, v in before.items()))
    return before


@pytest.fixture(scope="module")
def clean_cca(tmp_path_factory: pytest.TempPathFactory) -> float:
    return fashion_mnist_before(tmp_path_factory.mktemp("clean"), "attack=none")["cca"]


@pytest.mark.parametrize("mask", ["square", "watermark"])
def test_trojannn_reaches_95_percent_and_keeps_clean_accuracy(mask, clean_cca, tmp_path):
    before = fashion_mnist_before(tmp_path, "attack=trojannn", f"attack.mask={mask}")
    assert before["asr"] >= 0.95
    assert before["cca"] >= clean_cca - 0.03
