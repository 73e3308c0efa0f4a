"""Resume: a training interrupted by SIGTERM or SIGKILL continues from its last checkpoint when
the same command runs again, and ends with the very weights of an uninterrupted training."""

from __future__ import annotations

import os
import signal
import subprocess
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import run_bdrun, start_until_a_checkpoint

# long enough (40 epochs of digits) that the kill lands mid-training, one thread so the
# machine's load does not change the arithmetic
ARGS = ("train.epochs=40", "trainer.num_threads=1", "logger=none", "attack.poison_rate=0.1")


def entries(cache: Path) -> list[Path]:
    models = cache / "models"
    return (
        sorted(p for p in models.iterdir() if not p.name.startswith(".")) if models.exists() else []
    )


def checkpoints(cache: Path) -> list[Path]:
    return sorted((cache / "models" / ".checkpoints").glob("*/last.ckpt"))


def start_and_interrupt(cwd: Path, cache: Path, sig: signal.Signals) -> subprocess.CompletedProcess:
    """Start bdrun, wait for its first epoch checkpoint, then send `sig`."""
    env = {**os.environ, "BDRUN_CACHE": str(cache)}
    proc, _ = start_until_a_checkpoint(ARGS, cwd, env, timeout=240)
    assert proc.poll() is None, "the training ended before it could be interrupted"
    proc.send_signal(sig)
    out, err = proc.communicate(timeout=120)
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


def stored_weights(cache: Path) -> dict[str, torch.Tensor]:
    [entry] = entries(cache)
    return load_file(entry / "model.safetensors")


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory) -> dict[str, torch.Tensor]:
    cache = tmp_path_factory.mktemp("cache-straight")
    result = run_bdrun(*ARGS, cwd=tmp_path_factory.mktemp("cwd"), env={"BDRUN_CACHE": str(cache)})
    assert result.returncode == 0, result.stderr
    return stored_weights(cache)


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGKILL], ids=["sigterm", "sigkill"])
def test_interrupted_training_resumes_to_the_same_weights(tmp_path, sig, uninterrupted):
    cache = tmp_path / "cache"
    stopped = start_and_interrupt(tmp_path, cache, sig)
    if sig == signal.SIGTERM:
        assert stopped.returncode == 2
        lines = stopped.stderr.strip().splitlines()
        assert lines and "training stopped by SIGTERM" in lines[-1] and "resume" in lines[-1]
        assert not list((tmp_path / "outputs").rglob("results.json"))
    else:
        assert stopped.returncode == -signal.SIGKILL
    assert entries(cache) == []  # nothing half-trained in the cache
    [checkpoint] = checkpoints(cache)

    again = run_bdrun(*ARGS, cwd=tmp_path, env={"BDRUN_CACHE": str(cache)})
    assert again.returncode == 0, again.stderr
    [log] = [p for p in (tmp_path / "outputs").rglob("bdrun.log") if "resuming" in p.read_text()]
    assert str(checkpoint) in log.read_text()
    assert not checkpoint.exists()  # removed once the entry is stored
    resumed = stored_weights(cache)
    assert resumed.keys() == uninterrupted.keys()
    for name, tensor in uninterrupted.items():
        assert torch.equal(resumed[name], tensor), name


def test_a_truncated_checkpoint_is_ignored_and_training_starts_over(tmp_path):
    from bdrun.training import PLAIN_CHECKPOINT, last_checkpoint

    folder = tmp_path / "ckpt"
    folder.mkdir()
    (folder / "last.ckpt").write_bytes(b"PK\x03\x04 not a checkpoint")
    assert last_checkpoint(folder, PLAIN_CHECKPOINT) is None
    assert not (folder / "last.ckpt").exists()


def test_a_checkpoint_of_the_other_loop_is_ignored(tmp_path):
    from bdrun.training import LIGHTNING_CHECKPOINT, PLAIN_CHECKPOINT, last_checkpoint

    folder = tmp_path / "ckpt"
    folder.mkdir()
    torch.save({PLAIN_CHECKPOINT: 1, "epochs_done": 3}, folder / "last.ckpt")
    assert last_checkpoint(folder, PLAIN_CHECKPOINT) == folder / "last.ckpt"
    assert last_checkpoint(folder, LIGHTNING_CHECKPOINT) is None  # the loops share cache keys
    assert not (folder / "last.ckpt").exists()
