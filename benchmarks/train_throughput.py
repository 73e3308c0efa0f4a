"""Training throughput of bdrun's Lightning loop vs a plain PyTorch loop.

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
from bdrun.lightning_loop import fit
from bdrun.models.small_cnn import SmallCNN
from bdrun.training import TrainSettings, hardware_settings, train_settings


def plain_loop(model, data, settings: TrainSettings) -> None:
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
    hardware = hardware_settings(progress=False)
    torch.manual_seed(0)
    initial = SmallCNN((1, 28, 28), 10)
    samples = args.n * args.epochs
    times: dict[str, list[float]] = {"plain": [], "bdrun": []}
    for _ in range(args.repeats):
        for name in ("plain", "bdrun"):
            model = copy.deepcopy(initial)
            start = time.perf_counter()
            if name == "plain":
                plain_loop(model, data, settings)
            else:
                fit(model, data, settings, hardware, seed=0)
            times[name].append(time.perf_counter() - start)
    plain, ours = statistics.median(times["plain"]), statistics.median(times["bdrun"])
    print(
        f"threads={torch.get_num_threads()} n={args.n} epochs={args.epochs} batch={args.batch_size} repeats={args.repeats}"
    )
    print(f"plain PyTorch loop : {samples / plain:9.0f} samples/s  (median {plain:.2f}s)")
    print(
        f"bdrun (Lightning)  : {samples / ours:9.0f} samples/s  (median {ours:.2f}s, Trainer set-up included)"
    )
    print(f"throughput ratio bdrun/plain = {plain / ours:.3f}  (target >= 0.9)")


if __name__ == "__main__":
    main()
