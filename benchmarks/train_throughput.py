"""Training throughput of bdrun's two training loops (plain, Lightning's) vs a hand-written one.

Same model (small CNN, same initial weights), same data (Fashion-MNIST-shaped synthetic images
held in memory as uint8), same batch size, optimiser and schedule, same number of epochs, in one
process, alternating runs. Prints samples/s for both and their ratio (target >= 0.9).

    .venv/bin/python benchmarks/train_throughput.py [--n 12000] [--epochs 2] [--repeats 3]
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time

import torch
import torch.nn.functional as F

from bdrun.data.base import to_float
from bdrun.data.fake import FakeImages
from bdrun.data.loader import InMemoryLoader
from bdrun.models.small_cnn import SmallCNN
from bdrun.training import TrainSettings, fit, hardware_settings, train_settings


def hand_loop(model, data, settings: TrainSettings) -> None:
    opt = torch.optim.SGD(
        model.parameters(),
        lr=settings.lr,
        momentum=settings.momentum,
        weight_decay=settings.weight_decay,
        nesterov=True,
    )
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=settings.epochs)
    model.train()
    loader = InMemoryLoader(data, settings.batch_size, shuffle=True, seed=0)
    for _ in range(settings.epochs):
        for x, y, _ in loader:
            loss = F.cross_entropy(model(to_float(x)), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        sched.step()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=12000)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    data = FakeImages(shape=(1, 28, 28), num_classes=10, n_train=args.n, n_test=10).load().train
    settings = train_settings(epochs=args.epochs, batch_size=args.batch_size, lr=0.05)
    loops = {name: hardware_settings(progress=False, loop=name) for name in ("plain", "lightning")}
    torch.manual_seed(0)
    initial = SmallCNN((1, 28, 28), 10)
    samples = args.n * args.epochs
    times: dict[str, list[float]] = {"hand": [], "plain": [], "lightning": []}
    for _ in range(args.repeats):
        for name in times:
            model = copy.deepcopy(initial)
            start = time.perf_counter()
            if name == "hand":
                hand_loop(model, data, settings)
            else:
                fit(model, data, settings, loops[name], seed=0)
            times[name].append(time.perf_counter() - start)
    hand = statistics.median(times["hand"])
    print(
        f"threads={torch.get_num_threads()} n={args.n} epochs={args.epochs} "
        f"batch={args.batch_size} repeats={args.repeats} (the first Lightning run imports it)"
    )
    for name, label in (
        ("hand", "hand-written loop  "),
        ("plain", "bdrun plain loop   "),
        ("lightning", "bdrun Lightning    "),
    ):
        median = statistics.median(times[name])
        print(
            f"{label}: {samples / median:9.0f} samples/s  (median {median:.2f}s, "
            f"runs {', '.join(f'{t:.2f}' for t in times[name])}), hand / this = {hand / median:.3f}"
        )


if __name__ == "__main__":
    main()
