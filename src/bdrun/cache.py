"""Content-addressed store of trained models: safetensors + metadata, written atomically.

A model is stored under the hash of everything that determines it (the exact training tensors,
the model, training and trainer settings, training-time hooks, seed and package version), so a
second run that differs only downstream (another defense) loads it instead of training again.
Concurrent runs that need the same model serialise on a lock file; an entry becomes visible only
by an atomic rename, so a killed run never leaves a half-written entry behind. A model whose
weights are not finite (NaN, inf) is never stored, and never returned as a hit.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import logging
import os
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn

from bdrun.errors import BdrunError, TrainingDiverged
from bdrun.finite import nonfinite_count
from bdrun.fs import atomic_dir

log = logging.getLogger(__name__)

MODEL_FILE = "model.safetensors"
META_FILE = "meta.json"
RESULT_FILE = "result.json"


def finite_file(path: Path, names: set[str] | None = None) -> bool:
    """Whether the tensors of a safetensors file (those in `names`, or all) are finite."""
    from safetensors.torch import load_file

    tensors = load_file(path)
    return not any(nonfinite_count(t) for n, t in tensors.items() if names is None or n in names)


def first_nonfinite(model: nn.Module, companions: dict[str, nn.Module]) -> str | None:
    """The first of `model` (its whole state) and `companions` (their parameters: a training
    hook's buffers may be records that start at -inf or NaN) holding NaN / inf, or None."""
    if any(nonfinite_count(t) for t in model.state_dict().values()):
        return "the model"
    for name, module in companions.items():
        if any(nonfinite_count(p) for p in module.parameters()):
            return name
    return None


def companion_file(name: str) -> str:
    """File name of a companion module in an entry (a name like 'InputAwareHook.generator')."""
    safe = "".join(c if c.isalnum() or c in "._-" else "_" for c in name)
    return f"companion.{safe}.safetensors"


def tensor_digest(t: torch.Tensor) -> str:
    """BLAKE2b of a tensor's dtype, shape and bytes (0-dim ones too: BatchNorm's
    num_batches_tracked, in the state of a model that a training starts from)."""
    t = t.detach().cpu().contiguous()
    digest = hashlib.blake2b(digest_size=16)
    digest.update(f"{t.dtype}:{tuple(t.shape)}".encode())
    digest.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return digest.hexdigest()


def content_key(parts: dict[str, Any]) -> str:
    """A stable hash of JSON-able parts; tensors among them are replaced by their digests."""

    def encode(value: Any) -> Any:
        if isinstance(value, torch.Tensor):
            return {"tensor": tensor_digest(value)}
        if isinstance(value, dict):
            return {str(k): encode(v) for k, v in sorted(value.items(), key=lambda kv: str(kv[0]))}
        if isinstance(value, list | tuple):
            return [encode(v) for v in value]
        return value

    blob = json.dumps(encode(parts), sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:32]


class ModelCache:
    """Models under `root`/<key>/ (model.safetensors, meta.json).

    `enabled=False` trains every time and stores nothing; `refresh=True` retrains and replaces
    the stored entry.
    """

    def __init__(self, root: str | Path, enabled: bool = True, refresh: bool = False) -> None:
        self.root = Path(root).expanduser()
        self.enabled = enabled
        self.refresh = refresh

    def path(self, key: str) -> Path:
        return self.root / key

    @contextlib.contextmanager
    def _locked(self, key: str) -> Iterator[None]:
        """Hold the entry's lock file for the block. A block that fails while there is no entry
        removes the lock file, so a failed computation leaves nothing behind."""
        path = self.root / f".{key}.lock"
        while True:
            try:
                self.root.mkdir(parents=True, exist_ok=True)
                lock = open(path, "w")  # noqa: SIM115 (closed below)
            except OSError as err:
                raise BdrunError(
                    f"model cache folder {self.root} is not usable ({err.strerror}); set cache.dir or cache=false"
                ) from err
            fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes, also if killed
            # the holder we waited for may have removed the file: then lock the current one
            try:
                current = os.stat(path).st_ino == os.fstat(lock.fileno()).st_ino
            except FileNotFoundError:
                current = False
            if current:
                break
            lock.close()
        with lock:
            try:
                yield
            except BaseException:
                if not self.path(key).exists():
                    path.unlink(missing_ok=True)  # while held: a waiter sees it gone and retries
                raise

    def load_into(
        self, key: str, model: nn.Module, companions: dict[str, nn.Module] | None = None
    ) -> dict[str, Any] | None:
        """Load a stored entry into `model` (and its companion modules); return its metadata,
        or None if there is none or a companion is missing. An entry whose weights are not
        finite (written before bdrun refused to store one) is removed, and `model` left as it
        was."""
        from safetensors import SafetensorError
        from safetensors.torch import load_model

        entry = self.path(key)
        files = {name: companion_file(name) for name in companions or {}}
        if not all((entry / f).is_file() for f in [MODEL_FILE, *files.values()]):
            return None
        try:
            checks = {MODEL_FILE: None} | {
                files[name]: {n for n, _ in module.named_parameters()}
                for name, module in (companions or {}).items()
            }
            bad = next(
                (f for f, names in checks.items() if not finite_file(entry / f, names)), None
            )
            if bad is not None:
                log.warning("removing cache entry %s: %s is not finite", entry, bad)
                shutil.rmtree(entry, ignore_errors=True)
                return None
            load_model(model, entry / MODEL_FILE)
            for name, module in (companions or {}).items():
                load_model(module, entry / files[name])
            return json.loads((entry / META_FILE).read_text())
        except (OSError, RuntimeError, ValueError, SafetensorError) as err:  # unreadable: retrain
            log.warning("ignoring unreadable cache entry %s: %s", entry, err)
            return None

    def store(
        self,
        key: str,
        model: nn.Module,
        meta: dict[str, Any],
        companions: dict[str, nn.Module] | None = None,
    ) -> None:
        """Write an entry atomically: fill a temporary folder, then rename it into place. A model
        or companion whose weights are not finite is refused (TrainingDiverged)."""
        from safetensors.torch import save_model

        bad = first_nonfinite(model, companions or {})
        if bad is not None:
            raise TrainingDiverged(
                f"training diverged: the weights of {bad} are not finite, so it is not stored "
                "in the model cache; lower the learning rate"
            )
        self.root.mkdir(parents=True, exist_ok=True)
        with atomic_dir(self.path(key)) as tmp:
            save_model(model, str(tmp / MODEL_FILE))
            for name, module in (companions or {}).items():
                save_model(module, str(tmp / companion_file(name)))
            (tmp / META_FILE).write_text(json.dumps(meta, indent=2, default=str))

    def get_or_train(
        self,
        key: str,
        model: nn.Module,
        train: Callable[[], nn.Module],
        meta: dict[str, Any],
        companions: dict[str, nn.Module] | None = None,
    ) -> tuple[nn.Module, str]:
        """The model stored under `key` (loaded into `model`) or a freshly trained one.

        `companions` are modules trained together with the model (a training hook's trigger
        generator): `train` updates them in place, they are stored in the same entry, and a hit
        loads them back, so a cached model comes with the exact modules it was trained with.
        Returns (model, status) with status "hit", "miss" or "off" (cache disabled).
        """
        if not self.enabled:
            return train(), "off"
        with self._locked(key):
            if not self.refresh and self.load_into(key, model, companions) is not None:
                log.info("model cache hit %s", key)
                return model, "hit"
            trained = train()
            self.store(key, trained, meta, companions)
            log.info("model cache stored %s", key)
            return trained, "miss"

    def get_or_compute(
        self, key: str, compute: Callable[[], Any], meta: dict[str, Any]
    ) -> tuple[Any, str]:
        """A JSON-able result derived from models and data (a pruning curve), stored under `key`
        like a model: (value, "hit" | "miss" | "off"). NaN survives the round trip."""
        if not self.enabled:
            return compute(), "off"
        entry = self.path(key)
        with self._locked(key):
            if not self.refresh:
                try:
                    value = json.loads((entry / RESULT_FILE).read_text())
                    log.info("result cache hit %s", key)
                    return value, "hit"
                except FileNotFoundError:
                    pass
                except (OSError, ValueError) as err:  # unreadable: compute again
                    log.warning("ignoring unreadable cache entry %s: %s", entry, err)
            value = compute()
            self.root.mkdir(parents=True, exist_ok=True)
            with atomic_dir(entry) as tmp:
                (tmp / RESULT_FILE).write_text(json.dumps(value))
                (tmp / META_FILE).write_text(json.dumps(meta, indent=2, default=str))
            log.info("result cache stored %s", key)
            return value, "miss"
