"""A backdoored model someone else trained (CSAW-HackML 2020 BadNets, third-party checkpoints).

Nothing is poisoned or trained here: the model comes from a file and the backdoor test set from
poisoned HDF5 files whose labels are the attack's targets, as CSAW-HackML ships them
(`sunglasses_poisoned_data.h5`, `bd_test.h5`, the multi-trigger eyebrows / lipstick /
sunglasses files). ASR follows CSAW's eval scripts: the share of poisoned inputs classified as
their stored label.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
from torch import Tensor, nn

from bdrun.attacks.base import Attack
from bdrun.data.base import DataInfo, ImageSet
from bdrun.data.h5 import read_h5
from bdrun.errors import BdrunError
from bdrun.finite import check_data
from bdrun.metrics import accuracy

if TYPE_CHECKING:
    from bdrun.context import RunContext
    from bdrun.state import RunData

UNKNOWN_LABEL = -1  # orig_y of a poisoned input whose true label the file does not give


def read_true_labels(path: Path, key: str, count: int) -> Tensor:
    """The integer dataset `key` of an HDF5 file, as N labels."""
    import h5py

    with h5py.File(path, "r") as f:
        if key not in f:
            raise BdrunError(f"{path} has no dataset {key!r}; set attack.true_label_key or null")
        labels = np.asarray(f[key]).reshape(-1)
    check_data(labels, f"{path}: {key!r}")
    if len(labels) != count:
        raise BdrunError(f"{path}: {len(labels)} true labels {key!r} for {count} images")
    return torch.from_numpy(labels.astype(np.int64))


def metric_names(paths: Sequence[Path]) -> list[str]:
    """`asr_<file stem>` per file (lower-case, [a-z0-9_]), numbered where two stems agree."""
    names: list[str] = []
    for path in paths:
        base = "asr_" + re.sub(r"[^a-z0-9]+", "_", path.stem.lower()).strip("_")
        name, n = base, 2
        while name in names:
            name, n = f"{base}_{n}", n + 1
        names.append(name)
    return names


class Pretrained(Attack):
    """Load the attacker's model instead of training one; score it on the attacker's poisoned data.

    Parameters:
        weights: the backdoored model: a Keras 2 `.h5` file (weights-only or full model; the
            layer names must match the configured model, i.e. model=deepid for CSAW), a
            `.safetensors` file, or a PyTorch state dict (`.pt`/`.pth`, read with
            weights_only=True).
        poisoned: poisoned HDF5 files (one path or a list); each file's labels are the labels
            the attacker wants (CSAW semantics). Several files (multi-trigger attacks) give one
            ASR per file, `asr_<file stem>`, besides the overall ASR. Empty: no ASR (model
            inspection only, e.g. Neural Cleanse on a model of unknown provenance).
        divide_by, layout, x_key, y_key: how to read them, as `dataset.source.*` of dataset=h5
            (divide_by follows the dataset's by default).
        true_label_key: a dataset in the poisoned files with each input's true label, for RA and
            to drop inputs whose true label is already the target; null (CSAW) reports RA as
            null.
    The training set is left clean (poison rate 0). `target` is the most frequent stored label,
    for code that wants a single target.
    """

    name = "pretrained"
    stamps_inputs = False  # its backdoor inputs come from the poisoned files

    def __init__(
        self,
        weights: str | None,
        poisoned: str | Sequence[str] | None,
        divide_by: float | None,
        layout: str,
        x_key: str,
        y_key: str,
        true_label_key: str | None,
    ) -> None:
        # no poisoning here: the model and the poisoned files come from elsewhere
        super().__init__(target=0, poison_rate=0.0, label_mode="all2one")
        self.weights = weights
        if isinstance(poisoned, str):
            poisoned = [poisoned]
        self.poisoned_paths = [Path(p).expanduser() for p in (poisoned or [])]
        self.read_args = {"x_key": x_key, "y_key": y_key, "layout": layout, "divide_by": divide_by}
        self.true_label_key = true_label_key
        self.file_sets: list[ImageSet] = []
        self.file_metrics = metric_names(self.poisoned_paths)
        self._backdoor: ImageSet | None = None  # the files concatenated, by backdoor_test

    def setup(self, info: DataInfo, seed: int) -> None:
        self.info = info
        if not self.weights:
            raise BdrunError(
                "attack=pretrained needs attack.weights=PATH (Keras .h5, .safetensors or a "
                "PyTorch state dict)"
            )
        weights = Path(self.weights).expanduser()
        if not weights.is_file():
            raise BdrunError(f"attack.weights={self.weights}: file not found")
        self.file_sets = [self._read(path, info) for path in self.poisoned_paths]
        stored = torch.cat([s.y for s in self.file_sets]) if self.file_sets else torch.empty(0)
        if len(stored):
            self.target = Counter(stored.tolist()).most_common(1)[0][0]

    def _read(self, path: Path, info: DataInfo) -> ImageSet:
        data = read_h5(path, **self.read_args)
        if data.shape != info.shape:
            shape = "x".join(map(str, data.shape))
            raise BdrunError(
                f"attack.poisoned file {path} holds {shape} images but the data set's are "
                f"{'x'.join(map(str, info.shape))}"
            )
        if len(data) and int(data.y.max()) >= info.num_classes:
            raise BdrunError(
                f"attack.poisoned file {path} has label {int(data.y.max())} but the data set has "
                f"{info.num_classes} classes; set dataset.source.num_classes"
            )
        truth = torch.full_like(data.y, UNKNOWN_LABEL)
        if self.true_label_key:
            truth = read_true_labels(path, self.true_label_key, len(data))
        keep = truth != data.y  # an input already of the target class proves nothing
        return data.replace(orig_y=truth, poison=torch.ones(len(data), dtype=torch.bool)).subset(
            keep
        )

    # the training data stays clean: the attacker poisoned their own training set elsewhere
    def select(self, y: Tensor, g: torch.Generator) -> Tensor:
        return torch.zeros(len(y), dtype=torch.bool)

    def poison(self, train: ImageSet, g: torch.Generator) -> ImageSet:
        return train.replace(poison=torch.zeros(len(train), dtype=torch.bool))

    def apply_trigger(self, x: Tensor) -> Tensor:
        raise BdrunError(
            "attack=pretrained has no trigger function; its triggered inputs come from "
            "attack.poisoned files"
        )

    def backdoor_test(self, test: ImageSet) -> ImageSet:
        """All poisoned files, concatenated; y = stored (target) labels, orig_y = true labels or
        -1 when the files do not give them."""
        if not self.file_sets:
            empty = test.subset(torch.zeros(len(test), dtype=torch.bool))
            return empty.replace(orig_y=torch.full_like(empty.y, UNKNOWN_LABEL))
        parts = self.file_sets
        self._backdoor = ImageSet(
            torch.cat([s.x for s in parts]),
            torch.cat([s.y for s in parts]),
            poison=torch.ones(sum(len(s) for s in parts), dtype=torch.bool),
            orig_y=torch.cat([s.orig_y for s in parts]),
        )
        return self._backdoor

    def pretrained(self, poisoned_train: ImageSet, ctx: RunContext) -> nn.Module:
        from bdrun.models.weights import load_weights

        return load_weights(ctx.new_model(), self.weights)

    def evaluate(
        self, predict_fn: Callable[[Tensor], Tensor], data: RunData, ctx: RunContext
    ) -> dict[str, float]:
        """With several poisoned files, one ASR per file. (RA is NaN without true labels: the
        files' unknown labels are -1, which accuracy leaves out.)"""
        figures: dict[str, float] = {}
        if len(self.file_sets) > 1 and self._backdoor is not None:
            bd = self._backdoor
            preds = predict_fn(bd.x)
            start = 0
            for name, part in zip(self.file_metrics, self.file_sets, strict=True):
                stop = start + len(part)
                figures[name] = accuracy(preds[start:stop], bd.y[start:stop])
                start = stop
        return figures
