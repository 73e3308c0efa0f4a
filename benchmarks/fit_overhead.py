"""What one `fit` call costs beyond its arithmetic, in each training loop.

Defenses that train many times (NAD's teacher and student, MCR's curve endpoints, ABL's phases,
fine-tuning after each pruning) pay a training loop's set-up per call. This times `fit` on a
training of one step (64 samples, one batch, one epoch) in the plain loop and in Lightning's
(`trainer.loop=lightning`), alternating, after a first call of each (which pays the imports; it
is printed apart), against the same step written by hand (fresh optimizer, one forward,
backward and step). The difference is the per-call set-up.

    .venv/bin/python benchmarks/fit_overhead.py [--calls 20]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

from bdrun.data.base import to_float
from bdrun.data.fake import FakeImages
from bdrun.models.small_cnn import SmallCNN
from bdrun.training import fit, hardware_settings, optimizer_and_scheduler, train_settings

SETTINGS = train_settings(epochs=1, batch_size=64)


def model() -> torch.nn.Module:
    torch.manual_seed(0)
    return SmallCNN((1, 8, 8), 4, width=8, hidden=16, dropout=0.0)


def by_hand(data) -> None:
    net = model().train()
    opt, _ = optimizer_and_scheduler(net.parameters(), SETTINGS)
    loss = F.cross_entropy(net(to_float(data.x)), data.y)
    opt.zero_grad()
    loss.backward()
    opt.step()


def seconds(call) -> float:
    started = time.perf_counter()
    call()
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--calls", type=int, default=20)
    args = parser.parse_args()
    data = FakeImages(shape=(1, 8, 8), num_classes=4, n_train=64, n_test=8).load().train
    loops = {
        "plain": hardware_settings(loop="plain", progress=False),
        "lightning": hardware_settings(loop="lightning", progress=False),
    }
    sides = {
        "by hand": lambda: by_hand(data),
        **{
            name: (lambda h=hardware: fit(model(), data, SETTINGS, h, seed=0))
            for name, hardware in loops.items()
        },
    }
    first = {name: seconds(call) for name, call in sides.items()}
    times: dict[str, list[float]] = {name: [] for name in sides}
    for _ in range(args.calls):
        for name, call in sides.items():
            times[name].append(seconds(call))
    hand = statistics.median(times["by hand"])
    print(
        f"one-step fit, {args.calls} calls each after a first one, {torch.get_num_threads()} threads"
    )
    print("| side | first call | per call, median (range) | set-up per call |")
    print("|---|---|---|---|")
    for name, values in times.items():
        median = statistics.median(values)
        print(
            f"| {name} | {first[name] * 1e3:.0f} ms | {median * 1e3:.1f} ms "
            f"({min(values) * 1e3:.1f} to {max(values) * 1e3:.1f}) | "
            f"{(median - hand) * 1e3:.1f} ms |"
        )


if __name__ == "__main__":
    main()
