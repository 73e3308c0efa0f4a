"""A hand-written BadNets experiment on Fashion-MNIST that shares nothing with bdrun but the data
files: the baseline of benchmarks/process_cost.py.

What `bdrun dataset=fashion_mnist model=lenet train.epochs=2 train.batch_size=128
cache.enabled=false logger=none` does, written the way a researcher would by hand: read the IDX
files, keep 5 % of the training split aside (bdrun's defender holdout), poison 10 % of the rest
with a white 3x3 patch one pixel from the bottom-right corner, relabelled to class 0, train a
LeNet-5 (normalisation inside) with SGD (lr 0.05, Nesterov momentum 0.9, weight decay 5e-4,
cosine schedule over the epochs, batch 128, shuffled), then score CCA on the test set and ASR on
the non-target test images with the patch. Prints one JSON line: the figures, `train_s` (the
model and optimizer built and the training loop, the span of bdrun's `train_s`) and `total_s`
(from the first line of this file to the end).

    .venv/bin/python benchmarks/handwritten_fmnist.py [--root /usr/share/datasets/fashion-mnist]
"""

import time

STARTED = time.perf_counter()

import argparse  # noqa: E402
import gzip  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402
from torch import nn  # noqa: E402
from torch.nn import functional as F  # noqa: E402


def read_idx(path: Path) -> np.ndarray:
    with gzip.open(path, "rb") as f:
        data = f.read()
    dims = data[3]
    shape = [int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(dims)]
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * dims).reshape(shape)


class LeNet(nn.Module):
    def __init__(self, mean: float, std: float) -> None:
        super().__init__()
        self.mean, self.std = mean, std
        self.conv1 = nn.Conv2d(1, 6, 5, padding=2)
        self.conv2 = nn.Conv2d(6, 16, 5)
        self.fc1 = nn.Linear(16 * 5 * 5, 120)
        self.fc2 = nn.Linear(120, 84)
        self.fc3 = nn.Linear(84, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = (x - self.mean) / self.std
        x = F.max_pool2d(F.relu(self.conv1(x)), 2)
        x = F.max_pool2d(F.relu(self.conv2(x)), 2)
        x = F.relu(self.fc1(x.flatten(1)))
        return self.fc3(F.relu(self.fc2(x)))


def stamp(x: torch.Tensor) -> torch.Tensor:
    """A white 3x3 patch, one pixel from the bottom-right corner (uint8 images)."""
    x = x.clone()
    x[..., -4:-1, -4:-1] = 255
    return x


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", type=Path, default=Path("/usr/share/datasets/fashion-mnist"))
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    g = torch.Generator().manual_seed(args.seed)
    torch.manual_seed(args.seed)

    x_train = torch.from_numpy(read_idx(args.root / "train-images-idx3-ubyte.gz").copy())
    y_train = torch.from_numpy(read_idx(args.root / "train-labels-idx1-ubyte.gz").copy()).long()
    x_test = torch.from_numpy(read_idx(args.root / "t10k-images-idx3-ubyte.gz").copy())
    y_test = torch.from_numpy(read_idx(args.root / "t10k-labels-idx1-ubyte.gz").copy()).long()
    x_train, x_test = x_train.unsqueeze(1), x_test.unsqueeze(1)

    order = torch.randperm(len(x_train), generator=g)
    keep = order[round(0.05 * len(x_train)) :]  # 5 % held out for a defender
    x_train, y_train = x_train[keep], y_train[keep]
    candidates = (y_train != 0).nonzero().flatten()
    chosen = candidates[torch.randperm(len(candidates), generator=g)[: round(0.1 * len(x_train))]]
    x_train[chosen], y_train[chosen] = stamp(x_train[chosen]), 0

    # the training phase starts where bdrun's train_s does: before the model and the optimizer
    # are built (torch.optim imports torch._dynamo, 1.3 s, on the first optimizer it builds)
    trained = time.perf_counter()
    model = LeNet(0.2860, 0.3530)
    optimizer = torch.optim.SGD(
        model.parameters(), lr=0.05, momentum=0.9, nesterov=True, weight_decay=5e-4
    )
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=args.epochs)
    model.train()
    for _ in range(args.epochs):
        perm = torch.randperm(len(x_train), generator=g)
        for start in range(0, len(perm), args.batch_size):
            rows = perm[start : start + args.batch_size]
            x = x_train[rows].float().div_(255)
            loss = F.cross_entropy(model(x), y_train[rows])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
        schedule.step()
    train_s = time.perf_counter() - trained
    if not math.isfinite(float(loss.detach())):
        raise SystemExit("the training diverged")

    model.eval()
    with torch.no_grad():

        def predict(x: torch.Tensor) -> torch.Tensor:
            return torch.cat([model(b.float() / 255).argmax(1) for b in x.split(1024)])

        cca = float((predict(x_test) == y_test).float().mean())
        others = y_test != 0
        asr = float((predict(stamp(x_test[others])) == 0).float().mean())
    print(
        json.dumps(
            {
                "cca": cca,
                "asr": asr,
                "train_s": train_s,
                "steps": args.epochs * math.ceil(len(x_train) / args.batch_size),
                "total_s": time.perf_counter() - STARTED,
            }
        )
    )


if __name__ == "__main__":
    main()
