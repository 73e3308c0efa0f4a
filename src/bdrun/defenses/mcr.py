"""Mode connectivity repair: learn a curve of low clean loss between two models and take a
point on it, where the backdoor has faded but clean accuracy has not.

Zhao, Chen, Das, Ramamurthy & Lin, "Bridging Mode Connectivity in Loss Landscapes and
Adversarial Robustness", ICLR 2020, and the authors' code (github.com/IBM/model-sanitization:
backdoor/backdoor-cifar/train.py, train_baseline.py, data.py; curves.py as stored in the same
repository under Hessian/). A quadratic Bezier curve
    w(t) = (1 - t)^2 w_0 + 2 t (1 - t) theta + t^2 w_1,   t in [0, 1],
joins two end models w_0 and w_1 (held fixed, their --fix_start / --fix_end); its control
point theta starts at the midpoint (w_0 + w_1) / 2 (their init_linear; `init=random`: a fresh
initialisation, their --init_linear_off) and is trained on the defender's clean data with the
loss at a fresh t ~ U(0, 1) per batch plus their regulariser 0.5 * wd * ||w(t)||^2 on the
curve's point (curves.l2_regularizer; their curve optimizer has no weight decay of its own).
The paper connects two backdoored models, or, when the defender has only one, the model and a
copy of it fine-tuned on the clean data: bdrun has one poisoned model, so w_0 is the poisoned
model and w_1 its fine-tuned copy (`end_model=retrain`: a second poisoned model). BatchNorm
statistics are recomputed on the clean data at every point used (their update_bn); models
without BatchNorm skip this.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn
from torch.func import functional_call

from bdrun.data.base import to_float
from bdrun.defenses.base import NOTHING_CARRIED, Carried, Defense, require_holdout
from bdrun.defenses.finetune import finetune
from bdrun.defenses.pruning import copy_model, make_permanent
from bdrun.errors import BdrunError
from bdrun.metrics import accuracy, on_device, predict
from bdrun.report.pruning_curve import write_curve
from bdrun.rng import seeded_global
from bdrun.validate import check_schedule, check_sgd, coerce, fraction

if TYPE_CHECKING:
    from bdrun.context import RunContext
    from bdrun.data.base import ImageSet
    from bdrun.state import RunData

log = logging.getLogger(__name__)

PATH_COLUMNS = ("t", "holdout_acc", "cca", "asr", "ra")
END_MODELS = ("finetune", "retrain")
END_NAMES = {"finetune": "fine-tuned", "retrain": "second poisoned model"}
CONTROL_INITS = ("linear", "random")


def bezier(start: Tensor, control: Tensor, end: Tensor, t: float | Tensor) -> Tensor:
    """The quadratic Bezier point (1 - t)^2 start + 2 t (1 - t) control + t^2 end."""
    return (1 - t) ** 2 * start + 2 * t * (1 - t) * control + t**2 * end


def _key(name: str) -> str:
    return name.replace(".", "__")  # module names may not contain dots


class BezierCurve(nn.Module):
    """The curve between two models of one architecture; only the control point trains.

    In training mode every forward pass draws t ~ U(0, 1) from torch's global generator, which
    bdrun's training seeds per (seed, stream) and checkpoints, as it does for dropout; in eval
    mode it runs at `self.t`."""

    def __init__(
        self,
        start: nn.Module,
        end: nn.Module,
        control: nn.Module | None = None,
        point_decay: float = 0.0,
    ) -> None:
        """The control point starts at `control`'s weights, or without one at the midpoint
        (start + end) / 2; `point_decay` is the wd of the regulariser on w(t) (decay_hook)."""
        super().__init__()
        self.base = copy_model(start).requires_grad_(False)
        self.names = [name for name, _ in start.named_parameters()]
        start_params, end_params = dict(start.named_parameters()), dict(end.named_parameters())
        control_params = None if control is None else dict(control.named_parameters())
        self.control = nn.ParameterDict()
        for name in self.names:
            first, last = start_params[name].detach(), end_params[name].detach()
            self.register_buffer(f"start__{_key(name)}", first.clone())
            self.register_buffer(f"end__{_key(name)}", last.clone())
            initial = (
                (first + last) / 2 if control_params is None else control_params[name].detach()
            )
            self.control[_key(name)] = nn.Parameter(initial.clone())
        self.t = 0.0
        self.point_decay = point_decay

    def decay_hook(self, point: Tensor):
        """Adds point_decay * w(t) to w(t)'s gradient: the gradient of their regulariser
        0.5 * wd * ||w(t)||^2 on the curve's point (curves.py l2_regularizer), which reaches
        the control point as 2 t (1 - t) wd w(t)."""
        value, decay = point.detach(), self.point_decay
        return lambda grad: grad + decay * value

    def weights(self, t: float | Tensor) -> dict[str, Tensor]:
        """Parameter name -> the curve's value at t."""
        return {
            name: bezier(
                getattr(self, f"start__{_key(name)}"),
                self.control[_key(name)],
                getattr(self, f"end__{_key(name)}"),
                t,
            )
            for name in self.names
        }

    def forward(self, x: Tensor) -> Tensor:
        t = torch.rand((), device=x.device) if self.training else self.t
        weights = self.weights(t)
        if self.training and self.point_decay > 0:
            for point in weights.values():
                point.register_hook(self.decay_hook(point))
        return functional_call(self.base, weights, (x,))

    @torch.no_grad()
    def model_at(self, t: float) -> nn.Module:
        """A plain model (the base architecture) with the curve's weights at t."""
        model = copy_model(self.base).cpu()
        values = self.weights(float(t))
        for name, param in model.named_parameters():
            param.copy_(values[name].cpu())
        return model.requires_grad_(True).eval()


def fresh_model(ctx: RunContext, stream: str) -> nn.Module:
    """The run's architecture with newly drawn weights (the run's new_model() always starts
    from the same ones)."""
    with seeded_global(ctx.seed, stream):
        fresh = ctx.new_model()
        for module in fresh.modules():
            if module is not fresh and hasattr(module, "reset_parameters"):
                module.reset_parameters()
    return fresh


def has_batchnorm(model: nn.Module) -> bool:
    return any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())


@torch.no_grad()
def update_bn(
    model: nn.Module, x: Tensor, batch_size: int, device: str | torch.device = "cpu"
) -> nn.Module:
    """Recompute every BatchNorm layer's running mean / variance as the plain average over the
    batches of x (momentum None: a cumulative average, what their update_bn's momentum
    schedule computes). Models without BatchNorm are returned untouched."""
    layers = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if not layers or len(x) == 0:
        return model
    momenta = [layer.momentum for layer in layers]
    for layer in layers:
        layer.reset_running_stats()
        layer.momentum = None
    with on_device(model.train(), device):
        for start in range(0, len(x), batch_size):
            model(to_float(x[start : start + batch_size].to(device)))
    for layer, momentum in zip(layers, momenta, strict=True):
        layer.momentum = momentum
    return model.eval()


class ModeConnectivityRepair(Defense):
    """MCR as a repair defense: returns the model at `t` on the trained curve.

    Parameters (defaults from the authors' backdoor/backdoor-cifar/train.py unless noted):
        t: the point returned (0.3; issue 12's default, configurable).
        path_points: the path is scored at this many evenly spaced t in [0, 1] (11: 0, 0.1,
            ..., 1): CCA / ASR / RA on the test sets (scoring only) and the holdout accuracy
            (the defender's view) in mcr_path.csv / .png and the logger.
        path_samples: score the path on at most this many test / backdoor inputs (null: all).
        epochs: curve training epochs over the holdout (100; their README uses 200 to 600 on
            the 5,000 clean CIFAR-10 images they train curves on).
        lr, momentum, batch_size: SGD (0.01, 0.9, 128). Their schedule holds lr for half the
            epochs and decays it linearly to 1 % by 90 %; bdrun's cosine schedule is the
            nearest it offers.
        weight_decay: wd of their regulariser 0.5 * wd * ||w(t)||^2 (1e-4; their README uses
            3e-4 to 5e-4). Its gradient reaches theta as 2 t (1 - t) wd w(t): it pulls the middle
            of the curve towards zero wherever the clean loss does not hold it, which SGD's
            weight decay on theta alone would not (it only shrinks theta).
        init: the control point's start, "linear" (theirs, the midpoint) or "random" (a fresh
            initialisation of the architecture, stream "mcr-control-init").
        end_model: w_1. "finetune" (default): the poisoned model fine-tuned on the holdout for
            `finetune_epochs` at `finetune_lr` (the `finetune` defense's defaults, 10 epochs at
            0.01, the run's other training settings), the paper's choice for a defender with a
            single model. "retrain": a second model trained on the poisoned training set from
            another initialisation (stream "mcr-second-model"), the paper's main setting of two
            backdoored models. The authors' own backdoor runs (backdoor-cifar/train.py, data.py
            loaders_part_test) connect two models trained on the same poisoned data
            (--init_start / --init_end ..._same1 / _same2, our "retrain") and train the curve on
            50 clean test images (perc_training 0.01 of 5,000) repeated to 10,000, without
            augmentation (the training loader takes the test transform); their fine-tuned
            baseline (train_baseline.py) trains the poisoned model 100 epochs at lr 0.015
            (0.02 for SVHN), wd 1e-4, on the same repeated images: ~7,900 steps against the
            ~240 of bdrun's default fine-tuned end.
    On Fashion-MNIST (small CNN) the authors' defaults leave the backdoor in place at every t;
    tuning/defense_dataset/mcr_fashion_mnist.yaml holds the Fashion-MNIST settings that remove
    it, and docs/tuning/mcr_fashion_mnist.md every setting measured. The defaults here stay the
    authors'.
    The fine-tuned end and the curve go through the model cache.
    """

    name = "mcr"

    def __init__(
        self,
        t: float,
        path_points: int,
        path_samples: int | None,
        epochs: int,
        lr: float,
        momentum: float,
        batch_size: int,
        weight_decay: float,
        end_model: str,
        finetune_epochs: int,
        finetune_lr: float,
        init: str,
    ) -> None:
        if end_model not in END_MODELS:
            raise BdrunError(
                f"defense.end_model={end_model!r} must be one of {', '.join(END_MODELS)}"
            )
        if init not in CONTROL_INITS:
            raise BdrunError(f"defense.init={init!r} must be one of {', '.join(CONTROL_INITS)}")
        self.end_model, self.init = end_model, init
        self.t = fraction(t, "defense.t")
        self.path_points = coerce(path_points, "int", "defense.path_points")
        if self.path_points < 2:
            raise BdrunError(f"defense.path_points={path_points} must be >= 2, e.g. 11")
        self.path_samples = (
            None if path_samples is None else coerce(path_samples, "int", "defense.path_samples")
        )
        if self.path_samples is not None and self.path_samples < 1:
            raise BdrunError(f"defense.path_samples={path_samples} must be >= 1 or null")
        self.lr, self.epochs = check_schedule(lr, epochs)
        self.finetune_lr, self.finetune_epochs = check_schedule(
            finetune_lr, finetune_epochs, prefix="defense.finetune"
        )
        self.batch_size, self.momentum, self.weight_decay = check_sgd(
            batch_size, momentum, weight_decay
        )
        self.path: list[dict[str, Any]] = []

    def second_end(self, model: nn.Module, data: RunData, ctx: RunContext) -> nn.Module:
        """w_1: the model fine-tuned on the holdout, or a second model trained on the poisoned
        training set from another initialisation (`end_model=retrain`)."""
        if self.end_model == "retrain":
            # another mode needs another initialisation
            second, status = ctx.train_cached(
                data.train,
                stream="mcr-second-model",
                model=fresh_model(ctx, "mcr-second-init"),
                extra_key={"mcr": "second end model"},
            )
            log.info("MCR second end model: cache %s", status)
            return second
        return finetune(
            model,
            data.holdout,
            ctx,
            self.finetune_lr,
            self.finetune_epochs,
            stream="mcr-end",
            cache_key={"mcr": "fine-tuned end model"},
        )

    def train_curve(self, model: nn.Module, data: RunData, ctx: RunContext) -> BezierCurve:
        holdout = data.holdout
        end = self.second_end(model, data, ctx)
        control = fresh_model(ctx, "mcr-control-init") if self.init == "random" else None
        curve = BezierCurve(
            make_permanent(copy_model(model)), make_permanent(end), control, self.weight_decay
        )
        if self.epochs == 0:
            return curve.eval()
        settings = dataclasses.replace(
            ctx.settings,
            epochs=self.epochs,
            lr=self.lr,
            batch_size=self.batch_size,
            optimizer="sgd",
            momentum=self.momentum,
            weight_decay=0.0,  # theirs: the regulariser on w(t) instead (decay_hook)
            scheduler="cosine",
        )
        curve, status = ctx.train_cached(
            holdout,
            settings=settings,
            extra_key={"mcr": "quadratic Bezier curve", "point_decay": self.weight_decay},
            stream="mcr-curve",
            model=curve.train(),
            attack_hooks=False,
        )
        log.info("MCR curve: cache %s", status)
        return curve

    def point(self, curve: BezierCurve, t: float, holdout: ImageSet, ctx: RunContext) -> nn.Module:
        """The model at t, BatchNorm statistics recomputed on the holdout."""
        return update_bn(curve.model_at(t), holdout.x, ctx.settings.eval_batch_size, ctx.device)

    def score_path(
        self, curve: BezierCurve, data: RunData, ctx: RunContext
    ) -> list[dict[str, Any]]:
        """Holdout accuracy and CCA / ASR / RA at `path_points` evenly spaced t (scoring)."""
        g = ctx.generator("mcr-path")
        test = data.test.random_subset(self.path_samples, g)
        backdoor = data.backdoor_test.random_subset(self.path_samples, g)
        holdout = data.holdout
        batch, device = ctx.settings.eval_batch_size, ctx.device
        rows = []
        for t in torch.linspace(0, 1, self.path_points).tolist():
            model = self.point(curve, t, holdout, ctx)
            clean_preds = predict(model, test.x, batch, device)
            bd_preds = predict(model, backdoor.x, batch, device)
            rows.append(
                {
                    "t": round(t, 6),
                    "holdout_acc": accuracy(predict(model, holdout.x, batch, device), holdout.y),
                    "cca": accuracy(clean_preds, test.y),
                    "asr": accuracy(bd_preds, backdoor.y),
                    "ra": accuracy(bd_preds, backdoor.orig_y),
                }
            )
        return rows

    def repair(
        self, model: nn.Module, data: RunData, ctx: RunContext, carried: Carried = NOTHING_CARRIED
    ) -> nn.Module:
        require_holdout(data.holdout, 1, "MCR")
        curve = self.train_curve(model, data, ctx)
        path = self.score_path(curve, data, ctx)
        ctx.record(mcr_t=self.t, mcr_path=path)
        write_curve(
            ctx.run_dir,
            "mcr_path",
            path,
            ctx.logger,
            title=f"{self.name}: quadratic Bezier path (t = 0: poisoned, 1: {END_NAMES[self.end_model]})",
            columns=PATH_COLUMNS,
            x_key="t",
            x_label="t along the path",
            stops=[{"t": self.t, "label": f"chosen t = {self.t:g}"}],
        )
        return self.point(curve, self.t, data.holdout, ctx)
