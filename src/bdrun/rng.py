"""Seeded random streams: one named torch.Generator per pipeline stage, never the global RNG.

Each stage gets its own stream derived from (seed, stage name), so adding randomness to one stage
does not shift the numbers of another.
"""

import contextlib
import hashlib
from collections.abc import Iterator

import torch


def derive_seed(seed: int, stream: str) -> int:
    """A 63-bit seed for the named stream, stable across Python runs and platforms."""
    digest = hashlib.blake2b(f"{seed}:{stream}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & ((1 << 63) - 1)


def generator(seed: int, stream: str) -> torch.Generator:
    """A CPU generator for the named stream of the run seeded with `seed`."""
    g = torch.Generator()
    g.manual_seed(derive_seed(seed, stream))
    return g


@contextlib.contextmanager
def seeded_global(seed: int, stream: str) -> Iterator[None]:
    """Seed torch's global RNG inside the block and restore it after.

    Module initialisers and dropout only draw from the global RNG; fencing them here keeps model
    init and training reproducible without leaking state into the rest of the process.
    """
    devices = list(range(torch.cuda.device_count())) if torch.cuda.is_initialized() else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(derive_seed(seed, stream))
        yield
