"""Every figure a run reports: CCA, ASR and RA of a model, the detection quality of input
detectors and data inspectors, and batched prediction over in-memory tensors.

- CCA: accuracy on the clean test set.
- ASR: share of backdoor test inputs (true label != backdoor label, trigger applied) that the
  model classifies as their backdoor label.
- RA: share of those same inputs classified as their true label.
- Input detectors (STRIP, ...): scores are higher for inputs more likely to carry a trigger and
  an input is rejected when its score exceeds the threshold. FRR = share of clean test inputs
  rejected; FAR = share of backdoor test inputs accepted; AUROC of clean (negative) against
  backdoor (positive) scores; TPR at 1 % / 5 % FPR = the largest share of backdoor inputs caught
  while at most 1 % / 5 % of clean inputs are rejected.
- Data inspectors (spectral, activation clustering, ABL isolation): precision = share of removed
  training samples that were poisoned, recall = share of poisoned samples removed, removed = the
  count removed.
All rates are fractions in [0, 1]; a rate over an empty set is NaN.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

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


# A model that gives one label to at least this share of the clean test inputs is degenerate: on
# a test set with several classes no working classifier does (the largest class of GTSRB's test
# set is 6 % of it), and its ASR, where that label is the target, measures nothing.
DEGENERATE_SHARE = 0.9


def prediction_metrics(
    clean_preds: Tensor, backdoor_preds: Tensor, test: ImageSet, backdoor_test: ImageSet
) -> dict[str, Any]:
    """{"cca", "asr", "ra", "top_label_share", "degenerate"} from the predicted labels of the
    clean and the backdoor test set. `top_label_share` is the share of clean test inputs given
    the most common predicted label (a rejection by a detector counts as one label), and
    `degenerate` is true when it reaches DEGENERATE_SHARE."""
    n = len(clean_preds)
    top_share = int(clean_preds.bincount().max()) / n if n else math.nan
    return {
        "cca": accuracy(clean_preds, test.y),
        "asr": accuracy(backdoor_preds, backdoor_test.y),
        "ra": accuracy(backdoor_preds, backdoor_test.orig_y),
        "top_label_share": top_share,
        "degenerate": bool(top_share >= DEGENERATE_SHARE),
    }


def attack_metrics(
    predict_fn: Callable[[Tensor], Tensor], test: ImageSet, backdoor_test: ImageSet
) -> dict[str, Any]:
    """prediction_metrics of a function mapping images to predicted labels."""
    return prediction_metrics(predict_fn(test.x), predict_fn(backdoor_test.x), test, backdoor_test)


def _share(count: int, total: int) -> float:
    return count / total if total else math.nan


def _ranked(clean_scores: Tensor, trojan_scores: Tensor) -> tuple[Tensor, Tensor]:
    """Scores as dense ranks scaled into [0, 1] (torchmetrics would squash anything outside
    [0, 1] through a sigmoid, merging large scores), with labels 0 = clean, 1 = trojaned."""
    scores = torch.cat([clean_scores, trojan_scores]).double()
    distinct, rank = scores.unique(return_inverse=True)
    scaled = rank.double() / max(len(distinct) - 1, 1)
    labels = torch.cat([torch.zeros(len(clean_scores)), torch.ones(len(trojan_scores))]).long()
    return scaled, labels


def tpr_at_fpr(clean_scores: Tensor, trojan_scores: Tensor, max_fpr: float) -> float:
    """The largest true-positive rate whose false-positive rate is at most `max_fpr`."""
    if len(clean_scores) == 0 or len(trojan_scores) == 0:
        return math.nan
    from torchmetrics.functional.classification import binary_roc  # 0.4 s: only where scored

    scores, labels = _ranked(clean_scores, trojan_scores)
    fpr, tpr, _ = binary_roc(scores, labels)
    # float32 ROC points: 20/2000 must count as "at most 1 %"
    allowed = fpr <= max_fpr + 1e-6
    return round(float(tpr[allowed].max()), 6)


def auroc(clean_scores: Tensor, trojan_scores: Tensor) -> float:
    """Area under the ROC curve of trojaned (positive) against clean (negative) scores."""
    if len(clean_scores) == 0 or len(trojan_scores) == 0:
        return math.nan
    from torchmetrics.functional.classification import binary_auroc

    scores, labels = _ranked(clean_scores, trojan_scores)
    return round(float(binary_auroc(scores, labels)), 6)


def input_detection_metrics(
    clean_scores: Tensor, trojan_scores: Tensor, threshold: float
) -> dict[str, Any]:
    """{auroc, frr, far, tpr_at_fpr_1, tpr_at_fpr_5, threshold} of an input detector."""
    rejected_clean = int((clean_scores > threshold).sum())
    accepted_trojan = int((trojan_scores <= threshold).sum())
    return {
        "auroc": auroc(clean_scores, trojan_scores),
        "frr": _share(rejected_clean, len(clean_scores)),
        "far": _share(accepted_trojan, len(trojan_scores)),
        "tpr_at_fpr_1": tpr_at_fpr(clean_scores, trojan_scores, 0.01),
        "tpr_at_fpr_5": tpr_at_fpr(clean_scores, trojan_scores, 0.05),
        "threshold": float(threshold),
    }


def removal_metrics(removed: Tensor, poison: Tensor) -> dict[str, Any]:
    """{precision, recall, removed} of a bool removal mask against the ground-truth poison mask."""
    removed, poison = removed.bool(), poison.bool()
    caught = int((removed & poison).sum())
    return {
        "precision": _share(caught, int(removed.sum())),
        "recall": _share(caught, int(poison.sum())),
        "removed": int(removed.sum()),
    }


def per_class_rows(
    labels: Tensor, removed: Tensor, poison: Tensor
) -> tuple[list[str], list[list[int]]]:
    """(columns, rows) of a per-label removal table: samples, removed, poisoned, poisoned removed."""
    columns = ["label", "samples", "removed", "poisoned", "poisoned_removed"]
    rows = []
    for label in labels.unique().tolist():
        in_class = labels == label
        rows.append(
            [
                int(label),
                int(in_class.sum()),
                int((removed & in_class).sum()),
                int((poison & in_class).sum()),
                int((removed & poison & in_class).sum()),
            ]
        )
    return columns, rows
