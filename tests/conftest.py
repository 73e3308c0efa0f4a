"""Shared fixtures: an isolated model cache, config composition, and the CLI as a subprocess."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from omegaconf import DictConfig

import bdrun.compose
from bdrun.cli import CONF_DIR
from bdrun.data.base import ImageSet
from bdrun.runner import Setup, poison_stage, run, scorer_for, setup
from bdrun.state import RunData

REPO = Path(__file__).resolve().parents[1]
FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")

# A real-data test: marked `fashion_mnist` (CI's slow pass, `make test-slow-ci`, leaves these
# out) and skipped where Debian's dataset-fashion-mnist is missing.
needs_fashion_mnist = pytest.mark.fashion_mnist


def pytest_runtest_setup(item: pytest.Item) -> None:
    if item.get_closest_marker("fashion_mnist") and not FASHION_MNIST.is_dir():
        pytest.skip("apt-get install dataset-fashion-mnist")


@pytest.fixture(scope="session", autouse=True)
def isolated_env(tmp_path_factory: pytest.TempPathFactory) -> None:
    """Every test run gets its own model cache and offline wandb, and no progress bars."""
    os.environ["BDRUN_CACHE"] = str(tmp_path_factory.mktemp("bdrun-cache"))
    os.environ["WANDB_MODE"] = "offline"
    os.environ["CI"] = "true"
    os.environ.pop("HYDRA_FULL_ERROR", None)
    if int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1")) > 1:
        # pytest -n N: one torch thread per worker (and per bdrun it starts), so N workers
        # share the cores instead of each one's threads waiting on the others'
        os.environ["OMP_NUM_THREADS"] = "1"
        torch.set_num_threads(1)
    else:
        torch.set_num_threads(min(2, torch.get_num_threads()))


def compose_config(*overrides: str) -> DictConfig:
    """The config `bdrun OVERRIDES` runs, tuning applied (no run folder)."""
    return bdrun.compose.compose_config(overrides)


def run_fashion_mnist(run_dir: Path, *overrides: str) -> dict:
    """One in-process run on the real Fashion-MNIST (no logger) with these overrides; its
    results (results.json's content)."""
    return run(compose_config("dataset=fashion_mnist", "logger=none", *overrides), run_dir)


def repair_figures(results: dict) -> tuple[dict, dict, dict]:
    """(detection, before, after) of a run's metrics."""
    metrics = results["metrics"]
    return metrics["detection"], metrics["before"], metrics["after"]


def run_bdrun(
    *args: str, cwd: Path, env: dict[str, str] | None = None, timeout: int = 300
) -> subprocess.CompletedProcess:
    """Run the `bdrun` command in a subprocess from `cwd`."""
    return subprocess.run(
        [sys.executable, "-m", "bdrun.cli", *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, **(env or {})},
    )


def start_until_a_checkpoint(
    args: tuple[str, ...], cwd: Path, env: dict[str, str], timeout: float = 300
) -> tuple[subprocess.Popen, Path]:
    """Start `bdrun args` (env names its BDRUN_CACHE) and return once a training has written its
    first epoch checkpoint: the process, still running, and the checkpoint folder."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "bdrun.cli", *args],
        cwd=cwd,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    checkpoints = Path(env["BDRUN_CACHE"]) / "models" / ".checkpoints"
    deadline = time.monotonic() + timeout
    while not list(checkpoints.glob("*/last.ckpt")) and time.monotonic() < deadline:
        assert proc.poll() is None, ("bdrun ended before its first checkpoint", proc.communicate())
        time.sleep(0.02)
    return proc, checkpoints


@dataclass(frozen=True)
class Poisoned:
    """A run up to its poisoned training set, without training the poisoned model."""

    setup: Setup
    poisoned: ImageSet
    backdoor_test: ImageSet

    @property
    def clean_train(self) -> ImageSet:
        return self.setup.splits.train

    @property
    def attack(self):
        return self.setup.attack

    @property
    def ctx(self):
        return self.setup.ctx

    def data(self) -> RunData:
        splits = self.setup.splits
        return RunData(splits.info, self.poisoned, splits.holdout, splits.test, self.backdoor_test)

    def evaluate(self, model: torch.nn.Module) -> dict:
        """CCA, ASR, RA (and the attack's figures) of `model` on this run's test sets."""
        return scorer_for(self.attack, self.data(), self.ctx).evaluate(model)


def poison_only(run_dir: Path, *overrides: str, cfg: DictConfig | None = None) -> Poisoned:
    """Set up a run (from overrides, or a composed `cfg`) and run its poison stage with the
    runner's own functions, without training; the backdoor test set is built from the attack as
    it stands (before any training-time trigger is learned)."""
    built = setup(cfg if cfg is not None else compose_config(*overrides), run_dir)
    poisoned = poison_stage(built.attack, built.splits, built.ctx)
    return Poisoned(built, poisoned, built.attack.backdoor_test(built.splits.test))


def conf_options(group: str) -> list[str]:
    return sorted(p.stem for p in (Path(CONF_DIR) / group).glob("*.yaml"))


# defenses that learn masks on BatchNorm channels: the default small CNN has none
NEEDS_BATCH_NORM = frozenset({"anp", "rnp"})


def defense_model(defense: str) -> list[str]:
    """The model override a grid run of `defense` needs: model=small_cnn_bn where the defense
    works on BatchNorm channels, none otherwise."""
    return ["model=small_cnn_bn"] if defense in NEEDS_BATCH_NORM else []


def attack_overrides(attack: str, folder: Path, *overrides: str) -> list[str]:
    """Overrides an attack needs beyond its YAML to run in a test (given the other overrides).

    attack=pretrained gets generated files under `folder`: the configured model's seeded, untrained
    weights (safetensors) and a poisoned h5 file (CSAW layout, 0..255 values) of test images with
    a white 3x3 corner patch, labelled 0. attack=narcissus gets a short trigger optimisation,
    warm-up and surrogate (the authors' 1,000 passes, 5 epochs and train.epochs change nothing
    a test checks, and cost minutes on a loaded CPU). attack=lf searches its trigger on 20 images
    for one pass of DeepFool runs of at most 20 steps (a weak surrogate of random images lets
    DeepFool run its 200 steps on many), which keeps a run at seconds.
    """
    if attack == "narcissus":
        return ["attack.trigger_steps=20", "attack.warmup_epochs=1", "attack.surrogate_epochs=2"]
    if attack == "lf":
        return ["attack.passes=1", "attack.samples=20", "attack.deepfool_steps=20"]
    if attack != "pretrained":
        return []
    import h5py
    from safetensors.torch import save_file

    from bdrun.attacks.triggers import square_pattern, stamp
    from bdrun.config import build
    from bdrun.data.base import to_float
    from bdrun.data.splits import load_splits
    from bdrun.rng import seeded_global

    cfg = compose_config(*overrides, "attack=pretrained")
    splits = load_splits(cfg.dataset, int(cfg.seed))
    info = splits.info
    with seeded_global(0, "pretrained-test-model"):
        model = build(cfg.model, "model", in_shape=info.shape, num_classes=info.num_classes)
    weights = folder / "pretrained.safetensors"
    save_file(model.state_dict(), str(weights))
    test = splits.test.subset(splits.test.y != 0)
    x = to_float(test.x[:64])
    channels, height, width = info.shape
    x = stamp(x, square_pattern("white", 3, channels), torch.ones(1, 3, 3), height - 4, width - 4)
    poisoned = folder / "poisoned.h5"
    with h5py.File(poisoned, "w") as f:
        f["data"] = (x * 255).round().numpy()
        f["label"] = torch.zeros(len(x)).numpy()
    return [f"attack.weights={weights}", f"attack.poisoned=[{poisoned}]"]
