"""Load weights someone else trained into a bdrun model, without unpickling anything.

Formats, by file suffix: Keras 2 HDF5 (`.h5`, `.hdf5`, see bdrun.models.keras), safetensors
(`.safetensors`), and PyTorch state dicts (`.pt`, `.pth`, `.bin`, `.ckpt`) read with
`torch.load(weights_only=True)`, which refuses arbitrary pickled objects.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import Tensor, nn

from bdrun.errors import BdrunError
from bdrun.finite import check_weights

KERAS_SUFFIXES = (".h5", ".hdf5")
SAFETENSORS_SUFFIXES = (".safetensors",)
TORCH_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt")
# prefixes training frameworks put before a module's own parameter names
WRAPPER_PREFIXES = ("model.", "module.", "net.")


def read_state_dict(path: Path) -> dict[str, Tensor]:
    """A flat {name: tensor} from a safetensors file or a PyTorch state dict / checkpoint."""
    if path.suffix in SAFETENSORS_SUFFIXES:
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            return load_file(str(path))
        except (SafetensorError, OSError) as err:
            raise BdrunError(f"{path} is not a readable safetensors file ({err})") from None
    try:
        loaded = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # torch raises UnpicklingError, RuntimeError, ... for bad files
        detail = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise BdrunError(
            f"{path} is not a plain PyTorch state dict ({detail}); save model.state_dict() "
            "or convert it to safetensors"
        ) from None
    if isinstance(loaded, dict) and isinstance(loaded.get("state_dict"), dict):
        loaded = loaded["state_dict"]  # Lightning checkpoints
    if not isinstance(loaded, dict) or not all(isinstance(v, Tensor) for v in loaded.values()):
        raise BdrunError(f"{path} does not hold a state dict of tensors")
    return loaded


def strip_wrapper_prefix(state: dict[str, Tensor], expected: set[str]) -> dict[str, Tensor]:
    """Drop a prefix such as `model.` that every key has, when that makes the names match."""
    for prefix in WRAPPER_PREFIXES:
        if state and all(k.startswith(prefix) for k in state):
            stripped = {k[len(prefix) :]: v for k, v in state.items()}
            if set(stripped) <= expected:
                return stripped
    return state


def load_state(model: nn.Module, state: dict[str, Tensor], path: Path) -> nn.Module:
    """Copy `state` into `model`; a missing, unexpected or wrongly shaped entry is a BdrunError."""
    own = model.state_dict()
    state = strip_wrapper_prefix(state, set(own))
    missing = [k for k in own if k not in state]
    extra = [k for k in state if k not in own]
    if missing or extra:
        problem = (
            f"has no {missing[0]!r} that the model needs"
            if missing
            else f"has {extra[0]!r} that the model lacks"
        )
        raise BdrunError(
            f"{path} {problem} ({len(missing)} missing, {len(extra)} unexpected); "
            "pick the model the weights were trained as"
        )
    for key, value in state.items():
        if tuple(value.shape) != tuple(own[key].shape):
            raise BdrunError(
                f"{path}: {key!r} has shape {tuple(value.shape)} but the model needs "
                f"{tuple(own[key].shape)}; check the model and the data's shape and classes"
            )
    check_weights(state, str(path))
    model.load_state_dict(state)
    return model


def load_weights(model: nn.Module, path: str | Path) -> nn.Module:
    """Load the weights in `path` into `model` (in place) and return it, by file suffix."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise BdrunError(f"weights file not found: {path}")
    if path.suffix in KERAS_SUFFIXES:
        from bdrun.models.keras import load_keras_weights

        return load_keras_weights(model, path)
    if path.suffix in SAFETENSORS_SUFFIXES + TORCH_SUFFIXES:
        return load_state(model, read_state_dict(path), path)
    known = ", ".join(KERAS_SUFFIXES + SAFETENSORS_SUFFIXES + TORCH_SUFFIXES)
    raise BdrunError(f"weights file {path} has an unknown suffix {path.suffix!r}; use {known}")
