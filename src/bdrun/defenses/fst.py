"""FST: feature shift tuning, a fine-tuning that pushes the classification head away from the
backdoored one.

Min, Qin, Shen & Cheng, "Towards Stable Backdoor Purification through Feature Shift Tuning",
NeurIPS 2023, and the authors' code (github.com/AISafety-HKUST/stable_backdoor_purification:
fine_tune/ft.py and fine_tune/fst.py, `--ft_mode fst`; README.md). At low poisoning rates the
backdoor and clean features are entangled and plain fine-tuning keeps both; FST re-initialises
the head W and fine-tunes the whole model on clean data with cross-entropy + alpha * <W, W0>
(W0 the backdoored head, the inner product summed over its entries), so the features have to
shift away from the ones W0 reads; after every optimizer step W is scaled back to W0's
Frobenius norm, which keeps the inner-product term from just shrinking W.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from bdrun.defenses.base import NOTHING_CARRIED, Carried, Defense, require_holdout
from bdrun.defenses.finetune import OwnSgd, finetune
from bdrun.defenses.pruning import copy_model
from bdrun.errors import BdrunError
from bdrun.models.probes import get_module
from bdrun.training import Trainee, TrainingHook
from bdrun.validate import coerce

if TYPE_CHECKING:
    from bdrun.context import RunContext
    from bdrun.state import RunData


def classification_head(model: nn.Module, num_classes: int | None = None) -> tuple[str, nn.Linear]:
    """(name, module) of the model's last nn.Linear (in registration order), its classification
    head; a BdrunError when there is none, or when its outputs are not `num_classes`."""
    linears = [(name, m) for name, m in model.named_modules() if isinstance(m, nn.Linear)]
    if not linears:
        raise BdrunError(
            f"model {type(model).__name__} has no nn.Linear classification head for FST to "
            "re-initialise; use a model with a linear head (e.g. model=small_cnn_bn)"
        )
    name, head = linears[-1]
    if num_classes is not None and head.out_features != num_classes:
        raise BdrunError(
            f"the last nn.Linear of model {type(model).__name__} ({name}) has "
            f"{head.out_features} outputs, not one per class ({num_classes}); FST needs the "
            "linear head to be the model's last nn.Linear"
        )
    return name, head


@torch.no_grad()
def reinitialise(head: nn.Linear, generator: torch.Generator) -> None:
    """Weight and bias uniform in +-1/sqrt(in_features), as the authors' code (and the
    distribution of torch's own nn.Linear initialisation), drawn from `generator`."""
    bound = 1 / math.sqrt(head.in_features)
    head.weight.uniform_(-bound, bound, generator=generator)
    if head.bias is not None:
        head.bias.uniform_(-bound, bound, generator=generator)


@torch.no_grad()
def project_to_norm(weight: Tensor, norm: Tensor) -> None:
    """Scale `weight` in place to Frobenius norm `norm`."""
    weight.mul_(norm / torch.linalg.vector_norm(weight))


class FeatureShift(TrainingHook):
    """Cross-entropy + alpha * <W, W0> on every batch, W scaled back to ||W0|| after every
    optimizer step (`on_after_step`, which both training loops call after the step)."""

    resumable = True  # W0 and its norm never change

    def __init__(self, head_name: str, original: Tensor, alpha: float) -> None:
        self.head_name = head_name
        self.original = original.detach().clone()
        self.norm = torch.linalg.vector_norm(self.original)
        self.alpha = alpha
        self.head: nn.Linear | None = None

    def on_train_start(self, module: Trainee) -> None:
        self.head = get_module(module.model, self.head_name)
        self.original = self.original.to(module.device)
        self.norm = self.norm.to(module.device)

    def loss(self, logits: Tensor, y: Tensor, pos: Tensor, module: Trainee) -> Tensor:
        shift = (self.head.weight * self.original).sum()
        ce = F.cross_entropy(logits, y, label_smoothing=module.settings.label_smoothing)
        return ce + self.alpha * shift

    def on_after_step(self, module: Trainee) -> None:
        project_to_norm(self.head.weight, self.norm)


class Fst(Defense):
    """FST as a repair defense: re-initialise the head, fine-tune the whole model on the clean
    holdout with the feature-shift term and the head's norm projection.

    The head is the model's last nn.Linear (`classification_head`). The authors' clean share is
    a `--split_ratio` of the training set (their README's command: 2 % of CIFAR-10); bdrun
    fine-tunes on the whole clean holdout (dataset.holdout_fraction: 5 % of the training
    split on Fashion-MNIST; 10 % on digits).

    Parameters (defaults from the authors' fine_tune/ft.py and fst.py):
        alpha: weight of <W, W0>. Their code's default is 0.2 (`--alpha`); the README's FST
            command passes 0.1. The default is the code's 0.2; defense.alpha=0.1 is the README's.
        lr, epochs: 0.01 and 10 (the README's command; the paper's "only 10 epochs").
        batch_size, momentum, weight_decay: their SGD (128, 0.9, no weight decay). bdrun's SGD
            uses Nesterov momentum (bdrun.training.optimizer_and_scheduler); theirs is plain.
        Schedule: cosine annealing over the epochs, per epoch (theirs). No label smoothing:
            their `--lb_smooth` replaces the FST term when set, so FST runs without it.
    Their training transforms (crop, flip) are left out, as in bdrun's other fine-tunings. The
    tuned model goes through the model cache. Records the head (`fst_head`) and the cosine of
    the tuned head with the original one (`fst_head_cosine`, < 0: it points away).
    """

    name = "fst"

    def __init__(
        self,
        alpha: float,
        lr: float,
        epochs: int,
        batch_size: int,
        momentum: float,
        weight_decay: float,
    ) -> None:
        self.sgd = OwnSgd(lr, epochs, batch_size, momentum, weight_decay)
        self.alpha = coerce(alpha, "float", "defense.alpha")
        if self.alpha < 0:
            raise BdrunError(
                f"defense.alpha={alpha} must be >= 0, e.g. 0.2 (the authors' code) or 0.1"
            )

    def repair(
        self, model: nn.Module, data: RunData, ctx: RunContext, carried: Carried = NOTHING_CARRIED
    ) -> nn.Module:
        require_holdout(data.holdout, data.info.num_classes, "FST (one image per class)")
        start = copy_model(model)
        head_name, head = classification_head(start, data.info.num_classes)
        original = head.weight.detach().clone()
        reinitialise(head, ctx.generator("fst-head"))
        hook = FeatureShift(head_name, original, self.alpha)
        key: dict[str, Any] = {"defense": "fst", "alpha": self.alpha, "original_head": original}
        tuned = finetune(
            start,
            data.holdout,
            ctx,
            self.sgd.lr,
            self.sgd.epochs,
            stream="fst",
            cache_key=key,
            hooks=[hook],
            settings=self.sgd.settings(ctx.settings, label_smoothing=0.0),
        )
        tuned_head = get_module(tuned, head_name).weight.detach()
        cosine = F.cosine_similarity(tuned_head.flatten(), original.flatten(), dim=0)
        ctx.record(fst_head=head_name, fst_head_cosine=float(cosine))
        return tuned
