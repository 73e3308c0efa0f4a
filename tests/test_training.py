"""Training: same seed, same numbers on CPU; hooks see every batch; settings are validated."""

from __future__ import annotations

import pytest
import torch

from bdrun.data.base import ImageSet
from bdrun.data.fake import FakeImages
from bdrun.errors import BdrunError
from bdrun.models.small_cnn import SmallCNN
from bdrun.runner import run
from bdrun.training import TrainingHook, fit, hardware_settings, train_settings

from conftest import compose_config

SETTINGS = train_settings(epochs=2, batch_size=32, lr=0.05)


def data() -> ImageSet:
    return FakeImages(shape=(1, 8, 8), num_classes=4, n_train=256, n_test=8).load().train


def train_once(seed: int, hooks=()) -> torch.nn.Module:
    torch.manual_seed(seed + 100)  # different global state must not matter
    model = SmallCNN((1, 8, 8), 4, width=8, hidden=16, dropout=0.2)
    return fit(model, data(), SETTINGS, hardware_settings(), seed, hooks=hooks)


def test_same_seed_gives_identical_weights_and_another_seed_does_not():
    a, b, c = train_once(0), train_once(0), train_once(1)
    for (name, pa), pb, _pc in zip(
        a.state_dict().items(), b.state_dict().values(), c.state_dict().values(), strict=True
    ):
        assert torch.equal(pa, pb), name
    assert any(
        not torch.equal(pa, pc)
        for pa, pc in zip(a.state_dict().values(), c.state_dict().values(), strict=True)
    )


def test_training_leaves_the_global_rng_alone():
    model = SmallCNN((1, 8, 8), 4, width=8, hidden=16, dropout=0.2)
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    fit(model, data(), SETTINGS, hardware_settings(), seed=0)
    assert torch.equal(torch.rand(3), expected)


class CountingHook(TrainingHook):
    def __init__(self):
        self.rows, self.epochs = [], 0

    def on_batch(self, x, y, pos, module):
        assert x.dtype == torch.float32 and float(x.min()) >= 0 and float(x.max()) <= 1
        self.rows += pos.tolist()
        return x, y

    def on_epoch_end(self, module):
        self.epochs += 1


def test_hooks_see_every_training_row_each_epoch():
    hook = CountingHook()
    train_once(0, hooks=[hook])
    assert hook.epochs == 2 and sorted(hook.rows) == sorted(list(range(256)) * 2)


@pytest.mark.parametrize(
    "values, message",
    [
        ({"epochs": "abc"}, "train.epochs='abc' must be an integer"),
        ({"lr": -1}, "train.lr > 0"),
        ({"optimizer": "lbfgs"}, "train.optimizer='lbfgs'"),
        ({"epoch": 3}, "unknown train setting 'epoch'"),
    ],
)
def test_bad_train_settings_are_user_errors(values, message):
    with pytest.raises(BdrunError, match=message):
        train_settings(**values)


def test_mixed_precision_and_channels_last_path_trains_on_cpu():
    """The GPU trainer's code path (AMP autocast + channels-last), exercised with bf16 on CPU:
    it learns as well as full precision from the same initial weights."""
    from bdrun.metrics import accuracy, predict

    source = FakeImages(shape=(1, 8, 8), num_classes=4, n_train=512, n_test=256).load()
    settings = train_settings(epochs=5, batch_size=32)
    scores = {}
    for name, hardware in {
        "fp32": hardware_settings(),
        "amp": hardware_settings(precision="bf16-mixed", channels_last=True, deterministic=False),
    }.items():
        torch.manual_seed(0)
        model = SmallCNN((1, 8, 8), 4, width=16, hidden=32)
        trained = fit(model, source.train, settings, hardware, seed=0)
        assert next(trained.parameters()).is_contiguous()  # handed back in the default layout
        scores[name] = accuracy(predict(trained, source.test.x), source.test.y)
    assert scores["fp32"] > 0.9 and scores["amp"] > scores["fp32"] - 0.05, scores


def test_a_run_with_num_threads_leaves_the_process_thread_count_as_it_was(tmp_path):
    before = torch.get_num_threads()
    wanted = 1 if before != 1 else 2
    run(compose_config("logger=none", "train.epochs=1", f"trainer.num_threads={wanted}"), tmp_path)
    assert torch.get_num_threads() == before
