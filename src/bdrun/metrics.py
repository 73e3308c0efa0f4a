"""CCA, ASR and RA, and batched prediction over in-memory tensors.

- CCA: accuracy on the clean test set.
- ASR: share of backdoor test inputs (true label != backdoor label, trigger applied) that the
  model classifies as their backdoor label.
- RA: share of those same inputs classified as their true label.
All three are fractions in [0, 1].
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch
from torch import Tensor, nn

from bdrun.data.base import ImageSet, to_float


@contextmanager
def on_device(model: nn.Module, device: str | torch.device) -> Iterator[nn.Module]:
    """`model` moved to `device` for the duration, then back to where its parameters were
    (a cached or freshly trained model lives on the CPU; scoring runs where the trainer does)."""
    first = next(itertools.chain(model.parameters(), model.buffers()), None)
    home = None if first is None else first.device
    model.to(device)
    try:
        yield model
    finally:
        if home is not None:
            model.to(home)


@torch.no_grad()
def logits_of(
    model: nn.Module, x: Tensor, batch_size: int = 1024, device: str | torch.device = "cpu"
) -> Tensor:
    """Model outputs for every image of x (any storage dtype), batched, computed on `device`
    and returned on the CPU."""
    model.eval()
    outs = []
    with on_device(model, device):
        for start in range(0, len(x), batch_size):
            batch = to_float(x[start : start + batch_size].to(device, non_blocking=True))
            outs.append(model(batch).float().cpu())
    if not outs:
        return torch.empty(0, 0)
    return torch.cat(outs)


def predict(
    model: nn.Module, x: Tensor, batch_size: int = 1024, device: str | torch.device = "cpu"
) -> Tensor:
    """Predicted labels for every image of x."""
    out = logits_of(model, x, batch_size, device)
    return out.argmax(1) if out.numel() else torch.empty(0, dtype=torch.long)


def accuracy(preds: Tensor, labels: Tensor, num_classes: int | None = None) -> float:
    """Share of preds equal to labels, as an exact fraction; NaN for an empty set.

    A negative label means "unknown" (the true labels of a third-party poisoned file, see
    attack=pretrained) and is left out, so RA without true labels is NaN, never 0.
    (Counted directly rather than with torchmetrics, whose float32 result would turn 3/5 into
    0.6000000238 in results.json; torchmetrics tracks accuracy during training.)
    """
    known = labels >= 0
    if not bool(known.all()):
        preds, labels = preds[known], labels[known]
    if len(labels) == 0:
        return math.nan
    return int((preds == labels).sum()) / len(labels)


def attack_metrics(
    predict_fn: Callable[[Tensor], Tensor], test: ImageSet, backdoor_test: ImageSet
) -> dict[str, float]:
    """{"cca", "asr", "ra"} from a function mapping images to predicted labels."""
    clean_preds = predict_fn(test.x)
    bd_preds = predict_fn(backdoor_test.x)
    return {
        "cca": accuracy(clean_preds, test.y),
        "asr": accuracy(bd_preds, backdoor_test.y),
        "ra": accuracy(bd_preds, backdoor_test.orig_y),
    }
