"""GPU paths: trainer=gpu (AMP, channels-last, data held on the GPU) and DDP over NCCL.

The CUDA tests skip on machines without a GPU (CI has none); the loader test runs everywhere.
"""

from __future__ import annotations

import pytest
import torch

from bdrun.data.fake import FakeImages
from bdrun.data.loader import InMemoryLoader
from bdrun.runner import run

from conftest import attack_overrides, compose_config, conf_options, defense_model

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
DIGITS = ("logger=none", "train.epochs=8")


def test_a_device_loader_yields_the_batches_of_a_host_loader():
    data = FakeImages(shape=(1, 8, 8), n_train=300, n_test=10).load().train
    device = "cuda" if torch.cuda.is_available() else "cpu"
    host = InMemoryLoader(data, 64, shuffle=True, seed=3)
    resident = InMemoryLoader(data, 64, shuffle=True, seed=3, device=device)
    for _ in range(2):  # two epochs: two permutations
        batches = list(zip(host, resident, strict=True))
        assert len(batches) == 5
        for (x, y, pos), (xd, yd, posd) in batches:
            assert xd.device.type == device and xd.dtype == torch.uint8
            assert torch.equal(x, xd.cpu()) and torch.equal(y, yd.cpu())
            assert torch.equal(pos, posd.cpu())


@cuda
def test_gpu_training_matches_cpu_training_closely(tmp_path):
    cpu = run(compose_config(*DIGITS), tmp_path / "cpu")
    gpu = run(compose_config(*DIGITS, "trainer=gpu"), tmp_path / "gpu")
    assert gpu["config"]["trainer"]["precision"] == "16-mixed"
    for key in ("cca", "asr"):
        assert abs(gpu["metrics"]["before"][key] - cpu["metrics"]["before"][key]) <= 0.03
    assert gpu["metrics"]["before"]["asr"] >= 0.9


@cuda
@pytest.mark.parametrize("precision", ["bf16-mixed", "32-true"])
@pytest.mark.parametrize("data_on_device", [True, False])
def test_gpu_precisions_and_data_placement_train(tmp_path, precision, data_on_device):
    overrides = (
        f"trainer.precision={precision}",
        f"trainer.data_on_device={str(data_on_device).lower()}",
    )
    results = run(compose_config(*DIGITS, "trainer=gpu", *overrides), tmp_path)
    before = results["metrics"]["before"]
    assert before["cca"] >= 0.9 and before["asr"] >= 0.9


@cuda
def test_gpu_defenses_run_on_the_device(tmp_path):
    results = run(
        compose_config(
            *DIGITS, "trainer=gpu", "defense=fine_pruning", "+defense@defense_stack.strip=strip"
        ),
        tmp_path,
    )
    after, detection = results["metrics"]["after"], results["metrics"]["detection"]
    assert after["asr"] <= detection["far"] + 1e-9
    assert results["metrics"]["before"]["cca"] - after["cca"] <= 0.2


@cuda
def test_ddp_over_nccl_on_one_gpu(tmp_path):
    one = run(compose_config(*DIGITS, "trainer=gpu", "trainer.precision=32-true"), tmp_path / "1")
    ddp = run(compose_config(*DIGITS, "trainer=ddp", "trainer.devices=1"), tmp_path / "ddp")
    assert ddp["config"]["trainer"]["strategy"] == "ddp_spawn"
    for key in ("cca", "asr"):
        assert abs(ddp["metrics"]["before"][key] - one["metrics"]["before"][key]) <= 0.03


@cuda
@pytest.mark.parametrize(
    "attack, defense",
    [(a, "none") for a in conf_options("attack")]
    + [("badnets", d) for d in conf_options("defense") if d != "none"],
)
def test_every_attack_and_defense_runs_on_the_gpu(tmp_path, attack, defense):
    model = defense_model(defense)
    extra = attack_overrides(attack, tmp_path, "debug=smoke", "trainer=gpu", *model)
    cfg = compose_config(
        f"attack={attack}",
        f"defense={defense}",
        "debug=smoke",
        "trainer=gpu",
        "logger=none",
        *model,
        *extra,
    )
    results = run(cfg, tmp_path)
    for stage in ("before", "after"):
        for key in ("cca", "asr"):
            value = results["metrics"][stage][key]
            assert value is None or 0 <= value <= 1
