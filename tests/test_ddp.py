"""trainer=ddp: Lightning DDP over 2 CPU processes (gloo) trains the same model as one process.

train.batch_size is the global batch and every rank takes its strided share of each batch of
the same permutation, so DDP computes the same gradients as one process up to the order of
float additions: the metrics must agree closely, and they can only be high if the trained
weights came back from the worker processes to the main one.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch

from bdrun.data.digits import Digits
from bdrun.lightning_loop import fit
from bdrun.models.small_cnn import SmallCNN
from bdrun.training import HardwareSettings, hardware_settings, train_settings

from conftest import run_bdrun

ARGS = ("train.epochs=6", "logger=none", "cache=false", "trainer.num_threads=1")


def results(cwd: Path, *args: str) -> dict:
    cwd.mkdir()
    run = run_bdrun(*ARGS, *args, cwd=cwd, timeout=900)
    assert run.returncode == 0, run.stderr
    [path] = (cwd / "outputs").rglob("results.json")
    return json.loads(path.read_text())


@pytest.mark.slow
def test_two_cpu_processes_give_the_metrics_of_one(tmp_path):
    single = results(tmp_path / "one", "trainer=cpu")
    ddp = results(tmp_path / "two", "trainer=ddp", "trainer.devices=2")
    assert ddp["config"]["trainer"]["strategy"] == "ddp_spawn"
    for metric in ("cca", "asr"):
        one, two = single["metrics"]["before"][metric], ddp["metrics"]["before"][metric]
        assert abs(one - two) <= 0.02, (metric, one, two)
    assert ddp["metrics"]["before"]["cca"] > 0.85  # trained weights reached the main process
    assert ddp["metrics"]["before"]["asr"] > 0.85


@pytest.mark.slow
def test_ddp_weights_match_one_process_closely():
    data = Digits().load().train
    settings = train_settings(epochs=2, batch_size=64, lr=0.05)

    with torch.random.fork_rng():  # the same start in any test order
        torch.manual_seed(0)
        initial = SmallCNN(tuple(data.x.shape[1:]), 10, dropout=0.0)

    def train(hardware: HardwareSettings) -> dict[str, torch.Tensor]:
        model = copy.deepcopy(initial)
        return fit(model, data, settings, hardware, seed=0).state_dict()

    one = train(hardware_settings(accelerator="cpu", devices=1, num_threads=1))
    two = train(
        hardware_settings(
            accelerator="cpu", devices=2, strategy="ddp_spawn", deterministic=False, num_threads=1
        )
    )
    # Averaged gradients equal the full batch's up to rounding, but a rounding-sized change can
    # flip a ReLU near zero and grow over the steps: in one long pytest session (unseeded
    # start) conv2's weights missed allclose(atol=1e-4, rtol=1e-3), where runs here agree to
    # 1e-7 relative. Training without the averaging (one process at batch 32) differs by 1.1.
    for name, tensor in one.items():
        if tensor.is_floating_point() and tensor.norm() > 0:
            relative = (tensor - two[name]).norm() / tensor.norm()
            assert relative < 1e-2, (name, float(relative))
