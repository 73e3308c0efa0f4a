"""SAU: shared adversarial unlearning (repair).

Wei, Zhang, Zha & Wu, "Shared Adversarial Unlearning: Backdoor Mitigation by Unlearning Shared
Adversarial Examples", NeurIPS 2023; the first author's implementation is BackdoorBench's
(SCLBD/BackdoorBench defense/sau.py, class Shared_PGD, config/defense/sau/*.yaml), the source of
every default here.

A shared adversarial example (SAE) fools both the model being repaired and the frozen original
(backdoored) model into the same wrong label. The paper bounds the backdoor risk of the repaired
model by its risk on SAEs, so SAU alternates: PGD finds per-image perturbations that fool both
models alike (maximisation), and the model is trained to stay right on clean images while not
giving the label the original model gives to the perturbed image (minimisation).
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from bdrun.defenses.base import NOTHING_CARRIED, Carried, Defense
from bdrun.defenses.pruning import chunks, copy_model
from bdrun.defenses.unlearning import holdout_tensors, outer_optimizer, perturbed
from bdrun.errors import BdrunError
from bdrun.finite import DivergenceWatch
from bdrun.metrics import on_device
from bdrun.models.probes import NORMS, project_perturbation
from bdrun.validate import at_least, one_of, positive

if TYPE_CHECKING:
    from bdrun.context import RunContext
    from bdrun.state import RunData

log = logging.getLogger(__name__)

INITS = ("max", "min", "zero", "random")


def jensen_shannon(logits: Tensor, other: Tensor) -> Tensor:
    """Per-sample Jensen-Shannon divergence of two softmax distributions [N, K] -> [N], the
    probabilities clamped at 1e-8 (as Shared_PGD)."""
    p = F.softmax(logits, dim=1).clamp(min=1e-8)
    q = F.softmax(other, dim=1).clamp(min=1e-8)
    mix = (p + q) / 2
    return (0.5 * (p * (p.log() - mix.log()) + q * (q.log() - mix.log()))).sum(1)


def shared_loss(perturbed_logits: Tensor, reference_label: Tensor, mask: Tensor) -> Tensor:
    """SAU's unlearning term, summed over the masked samples (divide by the batch): for the
    label the original model gives the perturbed image, -log(1 - p) written as BackdoorBench
    does, half through the other labels' mass and half through 1 - p, both clamped so that a
    probability under 0.1 % counts as not shared."""
    probs = F.softmax(perturbed_logits, dim=1)
    one_hot = F.one_hot(reference_label, probs.shape[1]).to(probs.dtype)
    others = (probs * (1 - one_hot)).sum(1)
    own = (probs * one_hot).sum(1)
    terms = torch.log(1e-6 + others.clamp(max=0.999)) + torch.log(1 + 1e-6 - own.clamp(min=0.001))
    return -(terms * mask).sum() / 2


class Sau(Defense):
    """SAU as a repair defense, on the clean holdout (the authors use 5 % of the training set;
    here the whole holdout, dataset.holdout_fraction sets its size).

    For `n_rounds` epochs over the holdout, shuffled with the run's generator, in batches of
    `batch_size`:
    1. shared PGD (Shared_PGD.attack): per-image perturbations, started at the corner +bound
       (`init` max), `steps` signed-gradient steps of `step_size` that lower
       beta_1 * L_adv + beta_2 * L_share, each followed by the projection onto the `norm` ball
       of radius `bound`: L_adv is minus the mean (over both models) cross-entropy of the true
       labels, over the images a model still labels as it does the clean image; L_share the
       Jensen-Shannon divergence of the two models' outputs, over the images not yet a shared
       adversarial example (both models changed their label, to the same one). Stops early once
       every image is one;
    2. `outer_steps` optimizer steps on lmd_1 * CE(clean) + lmd_2 * CE(perturbed) +
       lmd_3 * `shared_loss` over the images whose perturbation fools the original model
       (its label differs from the true one and from its clean label).
    Both models stay in eval mode (BackdoorBench's default: BatchNorm keeps its running
    statistics; `train_mode` runs the repaired model's forward pass in train mode).

    Parameters (defaults from config/defense/sau/config.yaml, the same for cifar100, gtsrb and
    tiny):
        n_rounds: epochs over the holdout (100).
        batch_size: 256.
        optimizer, lr, weight_decay: Adam (betas 0.9, 0.999), 1e-4, 0. BackdoorBench builds a
            cosine schedule but sau.py never steps it: the rate stays constant, as here.
        norm, bound, step_size, steps: the PGD ball (linf, 0.2 in pixel units: sau.py adds the
            perturbation to the de-normalised image) and steps (0.2, 5).
        init: max (every pixel +bound), min, zero, or random (uniform in [-bound, bound] from
            the run's generator; BackdoorBench's `random` draws [0, 1) and clips it to the ball).
        beta_1, beta_2: weights of L_adv and L_share in the maximisation (0.01, 1).
        lmd_1, lmd_2, lmd_3: weights of the clean loss, adversarial training's loss and the
            shared loss in the minimisation (1, 0, 1).
        outer_steps: minimisation steps per batch (1).
        train_mode: the repaired model's forward pass in train mode (false).
        clamp: clip perturbed images to [0, 1] (false: sau.py leaves the clip out, as I-BAU's
            defense.py does).
    Records the share of holdout images that were shared adversarial examples in the last
    epoch (`sau_shared_share`).
    """

    name = "sau"

    def __init__(
        self,
        n_rounds: int,
        batch_size: int,
        optimizer: str,
        lr: float,
        weight_decay: float,
        norm: str,
        bound: float,
        step_size: float,
        steps: int,
        init: str,
        beta_1: float,
        beta_2: float,
        lmd_1: float,
        lmd_2: float,
        lmd_3: float,
        outer_steps: int,
        train_mode: bool,
        clamp: bool,
    ) -> None:
        self.n_rounds = at_least(n_rounds, "int", "n_rounds", 1, 100)
        self.batch_size = at_least(batch_size, "int", "batch_size", 1, 256)
        self.optimizer = one_of(optimizer, "optimizer", ("adam", "sgd"))
        self.lr = positive(lr, "lr", 1e-4)
        self.weight_decay = at_least(weight_decay, "float", "weight_decay", 0, 0)
        self.norm = one_of(norm, "norm", NORMS)
        self.bound = positive(bound, "bound", 0.2)
        if self.norm == "linf" and self.bound > 1:
            raise BdrunError(
                f"defense.bound={bound} must be <= 1 for norm=linf (pixels are in [0, 1]), e.g. 0.2"
            )
        self.step_size = positive(step_size, "step_size", 0.2)
        self.steps = at_least(steps, "int", "steps", 1, 5)
        self.init = one_of(init, "init", INITS)
        self.beta_1 = at_least(beta_1, "float", "beta_1", 0, 0.01)
        self.beta_2 = at_least(beta_2, "float", "beta_2", 0, 1)
        self.lmd_1 = at_least(lmd_1, "float", "lmd_1", 0, 1)
        self.lmd_2 = at_least(lmd_2, "float", "lmd_2", 0, 0)
        self.lmd_3 = at_least(lmd_3, "float", "lmd_3", 0, 1)
        self.outer_steps = at_least(outer_steps, "int", "outer_steps", 1, 1)
        self.train_mode = bool(train_mode)
        self.clamp = bool(clamp)

    def start(self, x: Tensor, g: torch.Generator) -> Tensor:
        """The PGD start, in the ball."""
        if self.init == "random":
            noise = torch.rand(x.shape, generator=g).to(x.device)
            delta = (2 * noise - 1) * self.bound
        else:
            sign = {"max": 1.0, "min": -1.0, "zero": 0.0}[self.init]
            delta = torch.full_like(x, sign * self.bound)
        return project_perturbation(delta, self.norm, self.bound)

    def shared_pgd(
        self, model: nn.Module, original: nn.Module, x: Tensor, y: Tensor, g: torch.Generator
    ) -> Tensor:
        """Per-image perturbations [N, C, H, W] that make both models change their label to
        the same wrong one (step 1)."""
        n = len(x)
        with torch.no_grad():
            clean_label = model(x).argmax(1)
            clean_label_original = original(x).argmax(1)
        delta = self.start(x, g)
        for _ in range(self.steps):
            delta.requires_grad_(True)
            images = perturbed(x, delta, self.clamp)
            logits, logits_original = model(images), original(images)
            label, label_original = logits.argmax(1), logits_original.argmax(1)
            fooled = label != clean_label
            fooled_original = label_original != clean_label_original
            shared = fooled & fooled_original & (label == label_original)
            cross_entropy = F.cross_entropy(logits, y, reduction="none")
            cross_entropy_original = F.cross_entropy(logits_original, y, reduction="none")
            adversarial = -(
                (cross_entropy * ~fooled).sum() + (cross_entropy_original * ~fooled_original).sum()
            ) / (2 * n)
            share = (jensen_shannon(logits, logits_original) * ~shared).sum() / n
            (grad,) = torch.autograd.grad(self.beta_1 * adversarial + self.beta_2 * share, delta)
            delta = project_perturbation(
                delta.detach() - self.step_size * grad.sign(), self.norm, self.bound
            )
            if bool(shared.all()):
                break
        return delta.detach()

    def unlearning_loss(
        self, model: nn.Module, original: nn.Module, x: Tensor, y: Tensor, delta: Tensor
    ) -> tuple[Tensor, Tensor]:
        """The minimisation's loss on one batch (step 2), and the mask of its shared adversarial
        examples."""
        images = perturbed(x, delta, self.clamp)
        model.train(self.train_mode)
        logits, perturbed_logits = model(torch.cat([x, images])).split(len(x))
        model.eval()
        with torch.no_grad():
            clean_label_original = original(x).argmax(1)
            label_original = original(images).argmax(1)
        fools_original = (label_original != y) & (label_original != clean_label_original)
        shared = fools_original & (perturbed_logits.argmax(1) == label_original)
        loss = self.lmd_1 * F.cross_entropy(logits, y)
        if self.lmd_2:
            loss = loss + self.lmd_2 * F.cross_entropy(perturbed_logits, y)
        unlearn = shared_loss(perturbed_logits, label_original, fools_original) / len(x)
        return loss + self.lmd_3 * unlearn, shared.detach()

    def repair(
        self, model: nn.Module, data: RunData, ctx: RunContext, carried: Carried = NOTHING_CARRIED
    ) -> nn.Module:
        repaired = copy_model(model).eval()
        original = copy_model(model).eval().requires_grad_(False)
        x, y = holdout_tensors(data.holdout, ctx, "SAU")
        order_g, init_g = ctx.generator("sau-order"), ctx.generator("sau-init")
        shared_count = torch.zeros((), device=x.device)
        with on_device(repaired, ctx.device), on_device(original, ctx.device):
            params = [p for p in repaired.parameters() if p.requires_grad]
            optimizer = outer_optimizer(params, self.optimizer, self.lr, self.weight_decay)
            watch = DivergenceWatch(
                "SAU's unlearning", self.lr, self.n_rounds, lr_setting="defense.lr"
            )
            for epoch in ctx.track(range(self.n_rounds), "SAU epochs"):
                order = torch.randperm(len(x), generator=order_g).to(x.device)
                shared_count = torch.zeros((), device=x.device)
                for batch in chunks(len(x), self.batch_size):
                    index = order[batch]
                    images, labels = x[index], y[index]
                    delta = self.shared_pgd(repaired, original, images, labels, init_g)
                    for _ in range(self.outer_steps):
                        loss, shared = self.unlearning_loss(
                            repaired, original, images, labels, delta
                        )
                        optimizer.zero_grad(set_to_none=True)
                        loss.backward()
                        optimizer.step()
                        watch.observe(loss)
                    shared_count += shared.sum()
                watch.check(epoch + 1, params)
        share = float(shared_count) / len(x)
        log.info("SAU: %.1f %% shared adversarial examples in the last epoch", 100 * share)
        ctx.record(sau_shared_share=share)
        return repaired.eval()
