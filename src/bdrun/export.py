"""Export a (repaired) model as a folder that works without the run: safetensors plus a JSON.

The folder holds `model.safetensors` (the weights), `model.json` (architecture, normalisation,
how stored pixels map to [0, 1]) and, for a GoodNet (the CSAW-HackML repaired-network scheme),
`reference.safetensors`: the original model B next to the repaired B'. The GoodNet outputs B''s
label where both agree and the extra class N (num_classes) where they disagree, so its labels lie
in [0, N]. `bdrun-eval` (bdrun.eval_cli) runs such a folder on image or h5 files.

Loading never unpickles and only builds classes from `bdrun.models`.
"""

from __future__ import annotations

import importlib
import inspect
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from bdrun import __version__
from bdrun.errors import BdrunError
from bdrun.fs import atomic_dir
from bdrun.metrics import predict

FORMAT = "bdrun-model/1"
DESCRIPTION_FILE = "model.json"
WEIGHTS_FILE = "model.safetensors"
REFERENCE_FILE = "reference.safetensors"
MODELS_PACKAGE = "bdrun.models."
# constructor arguments every bdrun model takes, stored from the model itself
SHAPE_ARGS = ("in_shape", "num_classes", "mean", "std")


def _buffer_values(model: nn.Module, name: str) -> list[float] | None:
    value = getattr(model, name, None)
    if not isinstance(value, Tensor):
        return None
    values = [float(v) for v in value.flatten()]
    neutral = 0.0 if name == "mean" else 1.0
    return None if all(v == neutral for v in values) else values


def model_config(model: nn.Module, options: dict[str, Any] | None = None) -> dict[str, Any]:
    """What rebuilds `model`: its class, shape, classes, normalisation and other options.

    `options` are the extra constructor arguments (the run's `model` config); without them,
    arguments that the model keeps as attributes of the same name (DeepID's input_scale) are
    read back from it.
    """
    cls = type(model)
    target = f"{cls.__module__}.{cls.__qualname__}"
    if not target.startswith(MODELS_PACKAGE):
        raise BdrunError(f"cannot export {target}: only models from bdrun.models can be exported")
    config: dict[str, Any] = {"_target_": target}
    if options is None:
        options = {
            name: getattr(model, name)
            for name in inspect.signature(cls.__init__).parameters
            if name not in ("self", *SHAPE_ARGS) and hasattr(model, name)
        }
    config.update({k: v for k, v in options.items() if k not in ("_target_", "name")})
    config["in_shape"] = list(getattr(model, "in_shape", ()))
    config["num_classes"] = int(getattr(model, "num_classes", 0))
    config["mean"] = _buffer_values(model, "mean")
    config["std"] = _buffer_values(model, "std")
    return config


def build_model(config: dict[str, Any]) -> nn.Module:
    """A fresh model from `model_config`'s description (classes from bdrun.models only)."""
    target = str(config.get("_target_", ""))
    module_name, _, class_name = target.rpartition(".")
    if not module_name.startswith(MODELS_PACKAGE.rstrip(".")):
        raise BdrunError(f"model class {target!r} is not a bdrun model; refusing to build it")
    try:
        cls = getattr(importlib.import_module(module_name), class_name)
    except (ImportError, AttributeError):
        raise BdrunError(f"unknown model class {target!r} (exported by another bdrun?)") from None
    kwargs = {k: v for k, v in config.items() if k != "_target_"}
    return cls(**kwargs)


def plain_state(model: nn.Module) -> dict[str, Tensor]:
    """The state dict with torch pruning masks folded in (`w_orig * w_mask` saved as `w`), so
    that a fine-pruned model loads into a fresh model of its architecture."""
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    for key in [k for k in state if k.endswith("_orig") and k[:-5] + "_mask" in state]:
        base = key[: -len("_orig")]
        state[base] = state.pop(key) * state.pop(base + "_mask")
    return {k: v.contiguous() for k, v in state.items()}


def _save_weights(model: nn.Module, path: Path) -> None:
    from safetensors.torch import save_file

    save_file(plain_state(model), str(path))


@torch.no_grad()
def _check_reproduces(original: nn.Module, loaded: nn.Module, what: str) -> None:
    """The loaded copy must give the original's logits: state outside the weights (a forward
    hook masking channels) would otherwise be lost without a word."""
    in_shape = tuple(getattr(original, "in_shape", ()))
    probe = torch.rand(8, *in_shape, generator=torch.Generator().manual_seed(0))
    device = next(original.parameters()).device
    was_training = original.training
    try:
        expected = original.eval()(probe.to(device)).cpu()
    finally:
        original.train(was_training)
    if not torch.allclose(loaded(probe), expected, rtol=1e-4, atol=1e-4):
        raise BdrunError(
            f"the exported {what} does not reproduce the model's outputs (state outside its "
            "weights, e.g. forward hooks); export a model whose weights carry everything"
        )


def save_model(
    folder: str | Path,
    model: nn.Module,
    options: dict[str, Any] | None = None,
    divide_by: float | None = 255.0,
    reference: nn.Module | None = None,
    extra: dict[str, Any] | None = None,
) -> Path:
    """Write `model` (and, for a GoodNet, its `reference`) to `folder`, complete or not at all.

    `divide_by` maps the values stored in the user's image / h5 files to [0, 1] (255 for CSAW's
    0..255 pixels; null when they already are). `extra` is stored as is (run, defense, metrics).
    The folder is loaded back before it is published, so an export that cannot be rebuilt fails
    here, not in the user's hands.
    """
    folder = Path(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    description = {
        "format": FORMAT,
        "bdrun": __version__,
        "model": model_config(model, options),
        "weights": WEIGHTS_FILE,
        "input": {"divide_by": divide_by, "range": [0.0, 1.0], "layout": "NCHW"},
        "guard": None,
        "extra": extra or {},
    }
    num_classes = description["model"]["num_classes"]
    description["labels"] = [0, num_classes - 1]
    if reference is not None:
        description["guard"] = {
            "rule": "disagree",
            "reference": REFERENCE_FILE,
            "flag_label": num_classes,
            "meaning": "label num_classes where the reference (original) model disagrees",
        }
        description["labels"] = [0, num_classes]
    with atomic_dir(folder) as tmp:
        _save_weights(model, tmp / WEIGHTS_FILE)
        if reference is not None:
            _save_weights(reference, tmp / REFERENCE_FILE)
        (tmp / DESCRIPTION_FILE).write_text(json.dumps(description, indent=2) + "\n")
        loaded = load_model(tmp)  # refuse to publish what cannot be loaded back
        _check_reproduces(model, loaded.model, "model")
        if reference is not None:
            _check_reproduces(reference, loaded.reference, "reference model")
    return folder


@dataclass
class ExportedModel:
    """A loaded export: the model, its optional GoodNet reference, and how to read inputs."""

    model: nn.Module
    reference: nn.Module | None
    description: dict[str, Any]

    @property
    def num_classes(self) -> int:
        return int(self.description["model"]["num_classes"])

    @property
    def in_shape(self) -> tuple[int, int, int]:
        return tuple(self.description["model"]["in_shape"])  # type: ignore[return-value]

    @property
    def divide_by(self) -> float | None:
        return self.description["input"]["divide_by"]

    @torch.no_grad()
    def predict(self, x: Tensor, batch_size: int = 1024) -> Tensor:
        """Labels for images x ([N, C, H, W] in [0, 1]); N = num_classes marks a GoodNet flag."""
        labels = predict(self.model, x, batch_size)
        if self.reference is not None:
            original = predict(self.reference, x, batch_size)
            flag = int(self.description["guard"]["flag_label"])
            labels = torch.where(original == labels, labels, torch.full_like(labels, flag))
        return labels


def _load_into(model: nn.Module, path: Path) -> nn.Module:
    from bdrun.models.weights import load_state, read_state_dict

    if not path.is_file():
        raise BdrunError(f"exported model is incomplete: {path} is missing")
    return load_state(model, read_state_dict(path), path).eval()


def load_model(folder: str | Path) -> ExportedModel:
    """Load a folder written by `save_model`."""
    folder = Path(folder).expanduser()
    description_path = folder / DESCRIPTION_FILE
    if not description_path.is_file():
        raise BdrunError(f"{folder} is not an exported bdrun model (no {DESCRIPTION_FILE})")
    try:
        description = json.loads(description_path.read_text())
    except json.JSONDecodeError as err:
        raise BdrunError(f"{description_path} is not valid JSON ({err})") from None
    if description.get("format") != FORMAT:
        raise BdrunError(f"{description_path}: format {description.get('format')!r} != {FORMAT}")
    config = description["model"]
    model = _load_into(build_model(config), folder / description["weights"])
    reference = None
    guard = description.get("guard")
    if guard:
        if guard.get("rule") != "disagree":
            raise BdrunError(f"{description_path}: unknown guard rule {guard.get('rule')!r}")
        reference = _load_into(build_model(config), folder / guard["reference"])
    return ExportedModel(model, reference, description)


# -- the run's artifacts ------------------------------------------------------------------------

MODEL_DIR = "model"
GOODNET_DIR = "goodnet"


def is_goodnet(detector: object) -> bool:
    """A detector that rejects where its `reference` and `repaired` models disagree (the
    GoodNet defense's Disagreement): exported as a GoodNet."""
    return isinstance(getattr(detector, "reference", None), nn.Module) and isinstance(
        getattr(detector, "repaired", None), nn.Module
    )


@dataclass(frozen=True)
class ExportSettings:
    """What a run's export needs from its config, read once in the runner's setup: whether to
    export (`export`), the model's constructor options, how the user's files map to [0, 1] (the
    h5 source's divide_by, else 8-bit images) and what model.json records of the run."""

    enabled: bool
    model_options: dict[str, Any]
    divide_by: float | None
    extra: dict[str, Any]

    @classmethod
    def from_config(cls, cfg: Any, names: dict[str, str], seed: int) -> ExportSettings:
        from omegaconf import OmegaConf

        node = OmegaConf.to_container(cfg.model, resolve=True)
        return cls(
            enabled=bool(cfg.get("export", True)),
            model_options={k: v for k, v in node.items() if k not in ("_target_", "name")},
            divide_by=(cfg.dataset.get("source") or {}).get("divide_by", 255.0),
            extra={**names, "seed": seed},
        )


def export_run(
    settings: ExportSettings,
    run_dir: Path,
    before: nn.Module,
    after: nn.Module,
    detectors: list[Any],
) -> dict[str, Any]:
    """Save what the run's defenses produced into the run folder; returns results.json's
    `artifacts` ({} when nothing was produced or `export: false`).

    - `model/`: the repaired model, when a defense changed the model;
    - `goodnet/`: a GoodNet (repaired model + the reference it is compared with), when a
      defense guards the model that way; `bdrun-eval run_dir/goodnet FILES` labels inputs.
    Detectors of other kinds (STRIP, ...) are not part of the export and are listed under
    `not_exported`. An export that fails is logged and recorded, never fails the run.
    """
    import logging

    if not settings.enabled:
        return {}
    extra = {**settings.extra, "run_dir": str(run_dir)}
    artifacts: dict[str, Any] = {}
    jobs = []
    if after is not before:
        jobs.append((MODEL_DIR, after, None))
    goodnets = [d for d in detectors if is_goodnet(d)]
    if goodnets:
        jobs.append((GOODNET_DIR, goodnets[0].repaired, goodnets[0].reference))
    others = [type(d).__name__ for d in detectors if not is_goodnet(d)]
    for folder, model, reference in jobs:
        try:
            save_model(
                run_dir / folder,
                model,
                settings.model_options,
                settings.divide_by,
                reference,
                extra,
            )
            artifacts[folder] = folder
        except BdrunError as err:
            logging.getLogger(__name__).warning("export of %s failed: %s", folder, err)
            artifacts[f"{folder}_error"] = str(err)
    if artifacts and others:
        artifacts["not_exported"] = others
    return artifacts
