"""A batched loader over in-memory tensors: one gather per batch, no per-sample Python."""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch import Tensor

from bdrun.data.base import ImageSet
from bdrun.rng import generator


class InMemoryLoader:
    """Yields (x, y, position) batches from an ImageSet (position = row in `data`).

    Images keep their storage dtype (uint8 stays uint8, so host-to-device copies are 4x
    smaller); the training module converts on the device. With `world_size` > 1 every rank
    takes a disjoint strided share of the same per-epoch permutation, padded like
    DistributedSampler so all ranks run the same number of steps.

    With a `device`, images and labels are copied there once and every batch is gathered on
    it (no per-step host-to-device copy; on a GPU the data set then costs its size in GPU
    memory). Positions come back on the same device.
    """

    def __init__(
        self,
        data: ImageSet,
        batch_size: int,
        shuffle: bool = False,
        seed: int = 0,
        drop_last: bool = False,
        rank: int = 0,
        world_size: int = 1,
        device: torch.device | str | None = None,
    ) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.data = data
        self.device = None if device is None else torch.device(device)
        self._x, self._y = data.x, data.y
        if self.device is not None:
            self._x, self._y = data.x.to(self.device), data.y.to(self.device)
        self.batch_size = batch_size
        self.shuffle = shuffle
        self.seed = seed
        self.drop_last = drop_last
        self.rank = rank
        self.world_size = world_size
        self.epoch = 0

    def _order(self) -> Tensor:
        n = len(self.data)
        if self.shuffle:
            order = torch.randperm(n, generator=generator(self.seed, f"loader:{self.epoch}"))
        else:
            order = torch.arange(n)
        if self.world_size > 1:
            per_rank = -(-n // self.world_size)
            pad = per_rank * self.world_size - n
            if pad:
                order = torch.cat([order, order[:pad]])
            order = order[self.rank :: self.world_size]
        return order

    def __len__(self) -> int:
        n = -(-len(self.data) // self.world_size)
        return n // self.batch_size if self.drop_last else -(-n // self.batch_size)

    def __iter__(self) -> Iterator[tuple[Tensor, Tensor, Tensor]]:
        order = self._order()
        if self.device is not None:
            order = order.to(self.device)
        self.epoch += 1  # each pass is one epoch; the next pass draws a fresh permutation
        stop = len(self) * self.batch_size
        for start in range(0, min(stop, len(order)), self.batch_size):
            idx = order[start : start + self.batch_size]
            yield self._x[idx], self._y[idx], idx
