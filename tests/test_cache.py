"""The content-addressed model cache: keys, atomic entries, hit / miss / refresh / off, locking."""

from __future__ import annotations

import contextlib
import hashlib
import math
import multiprocessing as mp
import time

import torch
from torch import nn

from bdrun.cache import ModelCache, content_key, tensor_digest


def make_model(value: float = 0.0) -> nn.Module:
    model = nn.Linear(3, 2)
    with torch.no_grad():
        model.weight.fill_(value)
        model.bias.fill_(value)
    return model


def test_key_depends_on_tensor_content_and_config_not_on_order():
    x = torch.arange(6.0)
    a = content_key({"x": x, "cfg": {"lr": 0.1, "epochs": 2}})
    assert a == content_key({"cfg": {"epochs": 2, "lr": 0.1}, "x": x.clone()})
    assert a != content_key({"x": x + 1, "cfg": {"lr": 0.1, "epochs": 2}})
    assert a != content_key({"x": x, "cfg": {"lr": 0.2, "epochs": 2}})
    assert a != content_key({"x": x.float().to(torch.float64), "cfg": {"lr": 0.1, "epochs": 2}})


def test_a_key_takes_zero_dim_tensors():
    # a BatchNorm model's state (num_batches_tracked) as the start of a cached fine-tuning
    state = dict(nn.BatchNorm2d(2).state_dict())
    assert state["num_batches_tracked"].dim() == 0
    key = content_key({"init": state})
    state["num_batches_tracked"] = torch.tensor(1)
    assert content_key({"init": state}) != key
    # other tensors hash as they did: dtype, shape, then their bytes (stored keys stay valid)
    x = torch.arange(4.0)
    by_hand = hashlib.blake2b(b"torch.float32:(4,)", digest_size=16)
    by_hand.update(x.numpy().tobytes())
    assert tensor_digest(x) == by_hand.hexdigest()


def test_miss_then_hit_then_refresh_then_off(tmp_path):
    calls = []

    def train(value):
        def fn():
            calls.append(value)
            return make_model(value)

        return fn

    cache = ModelCache(tmp_path)
    model, status = cache.get_or_train("k", make_model(), train(1.0), {"note": "first"})
    assert status == "miss" and float(model.weight.detach()[0, 0]) == 1.0
    model, status = cache.get_or_train("k", make_model(), train(2.0), {})
    assert status == "hit" and float(model.weight.detach()[0, 0]) == 1.0 and calls == [1.0]
    model, status = ModelCache(tmp_path, refresh=True).get_or_train(
        "k", make_model(), train(3.0), {}
    )
    assert status == "miss" and float(model.weight.detach()[0, 0]) == 3.0
    model, status = ModelCache(tmp_path, enabled=False).get_or_train(
        "k", make_model(), train(4.0), {}
    )
    assert status == "off" and calls == [1.0, 3.0, 4.0]
    assert ModelCache(tmp_path).load_into("k", make_model()) is not None
    assert sorted(p.name for p in tmp_path.iterdir() if not p.name.startswith(".")) == ["k"]


def test_a_training_that_fails_leaves_no_entry(tmp_path):
    cache = ModelCache(tmp_path)

    def broken():
        raise RuntimeError("killed")

    with contextlib.suppress(RuntimeError):
        cache.get_or_train("k", make_model(), broken, {})
    assert cache.load_into("k", make_model()) is None
    assert [p.name for p in tmp_path.iterdir() if not p.name.endswith(".lock")] == []


def test_an_unreadable_entry_is_trained_again(tmp_path):
    cache = ModelCache(tmp_path)
    cache.get_or_train("k", make_model(), lambda: make_model(1.0), {})
    (tmp_path / "k" / "model.safetensors").write_bytes(b"garbage")
    model, status = cache.get_or_train("k", make_model(), lambda: make_model(5.0), {})
    assert status == "miss" and float(model.weight.detach()[0, 0]) == 5.0


def _slow_train_worker(root, results):
    def train():
        time.sleep(1.0)
        return make_model(7.0)

    _, status = ModelCache(root).get_or_train("shared", make_model(), train, {})
    results.put(status)


def test_concurrent_processes_train_a_model_once(tmp_path):
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    procs = [
        ctx.Process(target=_slow_train_worker, args=(str(tmp_path), results)) for _ in range(2)
    ]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
    statuses = sorted(results.get(timeout=5) for _ in procs)
    assert statuses == ["hit", "miss"]


def test_results_are_computed_once_and_survive_json(tmp_path):
    calls = []

    def compute():
        calls.append(1)
        return [{"pruned": 0, "asr": float("nan"), "cca": 0.5}]

    cache = ModelCache(tmp_path)
    first, status = cache.get_or_compute("k", compute, {"what": "curve"})
    assert status == "miss" and len(calls) == 1
    second, status = cache.get_or_compute("k", compute, {"what": "curve"})
    assert status == "hit" and len(calls) == 1
    assert second[0]["pruned"] == 0 and second[0]["cca"] == 0.5 and math.isnan(second[0]["asr"])
    (tmp_path / "k" / "result.json").write_text("{not json")  # damaged: computed again
    _, status = cache.get_or_compute("k", compute, {"what": "curve"})
    assert status == "miss" and len(calls) == 2
    _, status = ModelCache(tmp_path, refresh=True).get_or_compute("k", compute, {})
    assert status == "miss" and len(calls) == 3
    _, status = ModelCache(tmp_path, enabled=False).get_or_compute("k", compute, {})
    assert status == "off" and len(calls) == 4
