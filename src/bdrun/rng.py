"""Seeded random streams: one named torch.Generator per pipeline stage, never the global RNG.

Each stage gets its own stream derived from (seed, stage name), so adding randomness to one stage
does not shift the numbers of another.
"""

import contextlib
import hashlib
import re
from collections.abc import Iterator
from typing import Any

import torch

from bdrun.errors import BdrunError


def run_seed(value: Any) -> int:
    """The run's `seed` as an int; anything but an integer is a user error.

    Any integer works, negative ones too: seeds only reach torch and sklearn through
    `derive_seed`, which maps them to [0, 2**63). A string holding an integer is accepted because
    `${oc.env:SEED}` yields one; floats are refused rather than truncated (seed=1.5 would
    silently repeat seed=1).
    """
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    if isinstance(value, str) and re.fullmatch(r"[+-]?\d+", value.strip()):
        return int(value)
    shown = "null" if value is None else str(value).lower() if isinstance(value, bool) else value
    raise BdrunError(f"seed={shown} must be an integer, e.g. seed=0")


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
