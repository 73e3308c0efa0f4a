"""Real-data fidelity (slow): BadNets on Fashion-MNIST behaves as the BadNets paper reports on MNIST.

Needs Debian's dataset-fashion-mnist (or the IDX files under $BDRUN_DATA/fashion_mnist/).
"""

from __future__ import annotations

import pytest

from bdrun.runner import run

from conftest import compose_config, needs_fashion_mnist, run_fashion_mnist

pytestmark = [
    pytest.mark.slow,
    needs_fashion_mnist,
]


def test_badnets_fashion_mnist_keeps_clean_accuracy_and_reaches_high_asr(tmp_path):
    clean = run_fashion_mnist(tmp_path / "clean", "attack=none")
    attacked = run(
        compose_config("experiment=badnets_fashion_mnist", "logger=none"), tmp_path / "badnets"
    )
    clean_cca = clean["metrics"]["before"]["cca"]
    before = attacked["metrics"]["before"]
    print(
        f"clean CCA {clean_cca:.4f}; BadNets CCA {before['cca']:.4f} ASR {before['asr']:.4f} RA {before['ra']:.4f}"
    )
    assert clean_cca > 0.88  # the small CNN learns Fashion-MNIST at all
    assert abs(before["cca"] - clean_cca) <= 0.01  # within 1 point of the clean model
    assert before["asr"] >= 0.97
    assert attacked["poison"]["train_poisoned"] == round(0.1 * attacked["poison"]["train_size"])
