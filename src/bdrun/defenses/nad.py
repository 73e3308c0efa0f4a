"""Neural Attention Distillation: a teacher fine-tuned on clean data guides the backdoored
student's attention while the student is fine-tuned on the same data.

Li, Lyu, Koren, Lyu, Li & Ma, "Neural Attention Distillation: Erasing Backdoor Triggers from Deep
Neural Networks", ICLR 2021, and the authors' code (github.com/bboylyg/NAD: config.py, main.py,
at.py, utils/util.py). The teacher is a copy of the backdoored model fine-tuned on the defender's
clean data; the student, another copy, is then trained on that data with cross-entropy plus
beta * the mean squared difference of the two networks' attention maps at chosen layers. An
attention map is the channel mean of |activation|^p, L2-normalised over the spatial positions
(at.py sums over channels; the normalisation makes sum and mean the same map).
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from bdrun.defenses.base import NOTHING_CARRIED, Carried, Defense, require_holdout
from bdrun.defenses.pruning import copy_model
from bdrun.errors import BdrunError
from bdrun.models.probes import get_module
from bdrun.training import Trainee, TrainingHook, TrainSettings
from bdrun.validate import check_schedule, check_sgd, coerce

if TYPE_CHECKING:
    from torch.utils.hooks import RemovableHandle

    from bdrun.context import RunContext
    from bdrun.data.base import ImageSet
    from bdrun.state import RunData

log = logging.getLogger(__name__)


def attention_map(activation: Tensor, p: float = 2.0, eps: float = 1e-6) -> Tensor:
    """[N, C, H, W] (or [N, C]) -> [N, H*W]: channel mean of |a|^p, each row divided by its L2
    norm (+ eps, as at.py)."""
    energy = activation.abs().pow(p).mean(1).flatten(1)
    return energy / (energy.norm(dim=1, keepdim=True) + eps)


def attention_loss(student: Tensor, teacher: Tensor, p: float = 2.0) -> Tensor:
    """Mean squared difference of the two attention maps (at.py's AT loss)."""
    return F.mse_loss(attention_map(student, p), attention_map(teacher, p))


def augment(
    x: Tensor, padding: int, flip: bool, cutout: int, generator: torch.Generator | None = None
) -> Tensor:
    """The authors' training transforms on a float batch [N, C, H, W] (data_loader.py): a random
    H x W crop of the image zero-padded by `padding` pixels, a horizontal flip with probability
    1/2, and one `cutout`-sized hole (their Cutout(1, length): rows and columns
    [centre - length // 2, centre + length // 2), centre uniform over the image) set to 0."""
    n, _, h, w = x.shape
    device = x.device
    if padding > 0:
        padded = F.pad(x, (padding, padding, padding, padding))
        top = torch.randint(0, 2 * padding + 1, (n, 1), generator=generator).to(device)
        left = torch.randint(0, 2 * padding + 1, (n, 1), generator=generator).to(device)
        rows = (top + torch.arange(h, device=device))[:, None, :, None]
        cols = (left + torch.arange(w, device=device))[:, None, None, :]
        batch = torch.arange(n, device=device)[:, None, None, None]
        channels = torch.arange(x.shape[1], device=device)[None, :, None, None]
        x = padded[batch, channels, rows, cols]
    if flip:
        flipped = torch.rand(n, generator=generator).to(device) < 0.5
        x = torch.where(flipped[:, None, None, None], x.flip(-1), x)
    if cutout > 0:
        centre_y = torch.randint(0, h, (n, 1), generator=generator).to(device)
        centre_x = torch.randint(0, w, (n, 1), generator=generator).to(device)
        ys, xs = torch.arange(h, device=device), torch.arange(w, device=device)
        half = cutout // 2
        in_rows = (ys >= centre_y - half) & (ys < centre_y + half)  # [N, H]
        in_cols = (xs >= centre_x - half) & (xs < centre_x + half)  # [N, W]
        hole = in_rows[:, :, None] & in_cols[:, None, :]
        x = x.masked_fill(hole[:, None], 0.0)
    return x


class Augmentation(TrainingHook):
    """`augment` on every training batch; draws from torch's global generator, which bdrun's
    training seeds per (seed, stream) and checkpoints, as it does for dropout."""

    resumable = True

    def __init__(self, padding: int, flip: bool, cutout: int) -> None:
        self.padding, self.flip, self.cutout = padding, flip, cutout

    def on_batch(self, x: Tensor, y: Tensor, pos: Tensor, module: Trainee) -> tuple[Tensor, Tensor]:
        return augment(x, self.padding, self.flip, self.cutout), y

    def key(self) -> dict[str, Any]:
        return {"padding": self.padding, "flip": self.flip, "cutout": self.cutout}


class AttentionDistillation(TrainingHook):
    """Cross-entropy + sum_l beta_l * attention_loss(student_l, teacher_l) on every batch.

    Forward hooks on the trained model and on the (frozen) teacher capture the outputs of
    `layers`; the teacher sees the same batch before the student's forward pass."""

    resumable = True  # the teacher never changes; nothing else is kept across epochs

    def __init__(
        self, teacher: nn.Module, layers: Sequence[str], betas: Sequence[float], p: float
    ) -> None:
        self.teacher = teacher.eval().requires_grad_(False)
        self.layers = list(layers)
        self.betas = [float(b) for b in betas]
        self.p = p
        self.student_out: dict[str, Tensor] = {}
        self.teacher_out: dict[str, Tensor] = {}
        self.handles: list[RemovableHandle] = []

    def _capture(self, model: nn.Module, into: dict[str, Tensor]) -> None:
        for name in self.layers:

            def keep(_module: nn.Module, _inputs: object, out: Tensor, name: str = name) -> None:
                into[name] = out

            self.handles.append(get_module(model, name).register_forward_hook(keep))

    def on_train_start(self, module: Trainee) -> None:
        self.close()
        self.teacher.to(module.device)
        self._capture(module.model, self.student_out)
        self._capture(self.teacher, self.teacher_out)

    def on_batch(self, x: Tensor, y: Tensor, pos: Tensor, module: Trainee) -> tuple[Tensor, Tensor]:
        with torch.no_grad():
            self.teacher(x)
        return x, y

    def loss(self, logits: Tensor, y: Tensor, pos: Tensor, module: Trainee) -> Tensor:
        total = F.cross_entropy(logits, y, label_smoothing=module.settings.label_smoothing)
        for name, beta in zip(self.layers, self.betas, strict=True):
            if beta:
                total = total + beta * attention_loss(
                    self.student_out[name], self.teacher_out[name], self.p
                )
        return total

    def close(self) -> None:
        """Remove the forward hooks (after training; the models stay usable as they were)."""
        for handle in self.handles:
            handle.remove()
        self.handles.clear()
        self.student_out.clear()
        self.teacher_out.clear()


class NeuralAttentionDistillation(Defense):
    """NAD as a repair defense: fine-tune a teacher, then distil its attention into the student.

    Parameters (defaults from the authors' config.py / utils/util.py unless noted):
        layers: modules whose outputs are distilled; null takes the model's `rank_layer` (the
            output of its last conv stage: relu2 of small_cnn and lenet), the counterpart of the
            last residual group of the WRN-16-1 where config.py puts its only non-zero beta.
        betas: one weight per layer. config.py puts beta3 = 5000 on the last group (beta1 =
            beta2 = 0). On bdrun's small CNN (no BatchNorm before relu2) 5000 made the student
            diverge in the first lr-0.1 epochs (docs/tuning/nad_fashion_mnist.md): the attention
            loss's gradient grows as the activations' norm shrinks, and nothing (no BatchNorm,
            no clipping in their code) bounds the step. The default is 500.
        p: power of the attention map (2.0).
        epochs: the student's training (20).
        lr, lr_epochs, late_lr: their step schedule (utils/util.py adjust_learning_rate): 0.1
            for the first 2 epochs, 0.01 after; for teacher and student alike. Run as two
            trainings, so SGD's momentum restarts at the step.
        teacher_epochs: the teacher's fine-tuning (their README: 5 to 10 epochs with the same
            code at beta = 0, "with data augmentation"; 10 here).
        batch_size, momentum, weight_decay: SGD with Nesterov momentum as main.py (64, 0.9,
            1e-4), for teacher and student; the learning rate stays constant.
        crop_padding, flip, cutout: their training transforms (data_loader.py
            get_train_loader: RandomCrop(32, padding=4), RandomHorizontalFlip, Cutout(1, 3)),
            on every teacher and student batch; 0 / false turns each off. They are what lets
            the teacher unlearn the backdoor (measured: docs/tuning/nad_fashion_mnist.md).
    Per-dataset values: conf/tuning/defense_dataset/nad_<dataset>.yaml, measured in
    docs/tuning/nad_<dataset>.md.
    The teacher and the student go through the model cache. The report adds the teacher's own
    CCA / ASR / RA (scored on the test sets) as teacher_cca, teacher_asr, teacher_ra.
    """

    name = "nad"

    def __init__(
        self,
        layers: Sequence[str] | None,
        betas: Sequence[float],
        p: float,
        epochs: int,
        lr: float,
        lr_epochs: int,
        late_lr: float,
        teacher_epochs: int,
        batch_size: int,
        momentum: float,
        weight_decay: float,
        crop_padding: int,
        flip: bool,
        cutout: int,
    ) -> None:
        self.lr, self.epochs = check_schedule(lr, epochs)
        self.late_lr, self.lr_epochs = check_schedule(late_lr, lr_epochs, prefix="defense.late")
        self.teacher_epochs = coerce(teacher_epochs, "int", "defense.teacher_epochs")
        if self.teacher_epochs < 0:
            raise BdrunError(f"defense.teacher_epochs={teacher_epochs} must be >= 0, e.g. 10")
        self.layers = None if layers is None else [str(name) for name in layers]
        self.betas = [coerce(b, "float", "defense.betas") for b in betas or ()]
        if any(b < 0 for b in self.betas) or not self.betas:
            raise BdrunError(f"defense.betas={list(betas or ())} must be >= 0, e.g. [5000]")
        if self.layers is not None and len(self.layers) != len(self.betas):
            raise BdrunError(
                f"defense.betas needs one weight per layer of defense.layers={self.layers}"
            )
        self.p = coerce(p, "float", "defense.p")
        if self.p <= 0:
            raise BdrunError(f"defense.p={p} must be > 0, e.g. 2.0")
        self.batch_size, self.momentum, self.weight_decay = check_sgd(
            batch_size, momentum, weight_decay
        )
        self.crop_padding = coerce(crop_padding, "int", "defense.crop_padding")
        self.cutout = coerce(cutout, "int", "defense.cutout")
        if self.crop_padding < 0 or self.cutout < 0:
            raise BdrunError(
                "defense.crop_padding and defense.cutout must be >= 0 (0 turns them off), e.g. 4, 3"
            )
        self.flip = bool(flip)

    def resolved_layers(self, model: nn.Module) -> list[str]:
        layers = self.layers or [getattr(model, "rank_layer", "")]
        if not all(layers):
            raise BdrunError(
                f"model {type(model).__name__} names no rank layer; set defense.layers=[LAYER]"
            )
        if len(layers) != len(self.betas):
            raise BdrunError(f"defense.betas needs one weight per layer of {layers}")
        for name in layers:
            get_module(model, name)  # a BdrunError listing the layers when a name is wrong
        return layers

    def settings(self, ctx: RunContext) -> TrainSettings:
        return dataclasses.replace(
            ctx.settings,
            batch_size=self.batch_size,
            optimizer="sgd",
            momentum=self.momentum,
            weight_decay=self.weight_decay,
            scheduler="none",
        )

    def phases(self, epochs: int) -> list[tuple[float, int]]:
        """(lr, epochs) of the authors' step schedule: `lr` for the first `lr_epochs` epochs,
        `late_lr` after (each phase one training; SGD's momentum restarts between them)."""
        first = min(self.lr_epochs, epochs)
        return [(lr, n) for lr, n in ((self.lr, first), (self.late_lr, epochs - first)) if n]

    def train_in_phases(
        self,
        model: nn.Module,
        holdout: ImageSet,
        ctx: RunContext,
        role: str,
        epochs: int,
        hooks: Sequence[TrainingHook],
        key: dict[str, Any],
    ) -> nn.Module:
        """A copy of `model` trained on the holdout through the step schedule, one cached
        training per phase (`role`: teacher or student; `key`: what else determines it)."""
        model = copy_model(model)
        for phase, (lr, phase_epochs) in enumerate(self.phases(epochs)):
            model, status = ctx.train_cached(
                holdout,
                hooks=hooks,
                settings=dataclasses.replace(self.settings(ctx), lr=lr, epochs=phase_epochs),
                extra_key={"nad": role, "phase": phase, **key},
                stream=f"nad-{role}-{phase}",
                model=model.train(),
                attack_hooks=False,
            )
            log.info("NAD %s, phase %d: cache %s", role, phase, status)
        return model.eval()

    def repair(
        self, model: nn.Module, data: RunData, ctx: RunContext, carried: Carried = NOTHING_CARRIED
    ) -> nn.Module:
        holdout = data.holdout
        require_holdout(holdout, 1, "NAD")
        layers = self.resolved_layers(model)
        augmentation = Augmentation(self.crop_padding, self.flip, self.cutout)
        augment = {"augment": augmentation.key()}
        teacher = self.train_in_phases(
            model, holdout, ctx, "teacher", self.teacher_epochs, [augmentation], augment
        )
        hook = AttentionDistillation(copy_model(teacher), layers, self.betas, self.p)
        distilled = {
            "teacher": dict(teacher.state_dict()),
            "layers": layers,
            "betas": self.betas,
            "p": self.p,
        }
        try:
            student = self.train_in_phases(
                model, holdout, ctx, "student", self.epochs, [augmentation, hook],
                {**distilled, **augment},
            )  # fmt: skip
        finally:
            hook.close()
        teacher_metrics = ctx.evaluate(teacher)  # a figure of the teacher, decided on nothing
        ctx.record(
            nad_layers=layers,
            **{f"teacher_{key}": teacher_metrics[key] for key in ("cca", "asr", "ra")},
        )
        return student
