"""ANP: prune the BatchNorm channels that an adversarial neuron perturbation exposes (repair).

Wu & Wang, "Adversarial Neuron Pruning Purifies Backdoored Deep Models", NeurIPS 2021, and the
authors' code (github.com/csdongxian/ANP_backdoor: optimize_mask_cifar.py, prune_neuron_cifar.py,
models/anp_batchnorm.py). Backdoor neurons are the ones whose small multiplicative perturbation
most easily breaks the clean predictions; ANP learns a mask per neuron that keeps the clean loss
low both as it is and under the worst perturbation of the neurons, and prunes the neurons whose
mask falls low.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

from bdrun.defenses.bn_masks import (
    BnChannels,
    BnMaskPruning,
    mask_step,
    scaled_forward,
    working_copy,
)
from bdrun.errors import BdrunError
from bdrun.finite import DivergenceWatch
from bdrun.rng import seeded_global
from bdrun.validate import at_least, check_sgd, coerce, fraction, positive

if TYPE_CHECKING:
    from bdrun.context import RunContext
    from bdrun.data.base import ImageSet


def perturbation_step(
    model: nn.Module,
    channels: BnChannels,
    x: Tensor,
    y: Tensor,
    mask: Tensor,
    noise: Tensor,
    noise_bias: Tensor,
    eps: float,
    steps: int,
    g: torch.Generator,
) -> None:
    """The authors' inner maximisation, in place on `noise` and `noise_bias` ([total] each): a
    uniform start in [-eps, eps], then `steps` signed-gradient ascent steps of size eps / steps
    on the clean loss of the model whose BatchNorm weights are scaled by (mask + noise) and biases
    by (1 + noise_bias). As in their code the noise is not clipped after a step (one step from a
    random start can reach 2 eps)."""
    with torch.no_grad():
        noise.uniform_(-eps, eps, generator=g)
        noise_bias.uniform_(-eps, eps, generator=g)
    step = eps / steps
    for _ in range(steps):
        noise.grad = noise_bias.grad = None
        logits = scaled_forward(model, channels, x, mask.detach() + noise, 1 + noise_bias)
        loss = torch.nn.functional.cross_entropy(logits, y)
        grad_noise, grad_bias = torch.autograd.grad(loss, (noise, noise_bias))
        with torch.no_grad():
            noise.add_(step * grad_noise.sign())
            noise_bias.add_(step * grad_bias.sign())


def anp_loss(
    model: nn.Module,
    channels: BnChannels,
    x: Tensor,
    y: Tensor,
    mask: Tensor,
    noise: Tensor | None,
    noise_bias: Tensor | None,
    alpha: float,
) -> tuple[Tensor, Tensor]:
    """(alpha * natural loss + (1 - alpha) * perturbed loss, the natural logits): the mask's
    objective in optimize_mask_cifar.py's mask_train (no perturbed term without noise)."""
    logits = scaled_forward(model, channels, x, mask)
    natural = torch.nn.functional.cross_entropy(logits, y)
    if noise is None or noise_bias is None:
        return alpha * natural, logits
    perturbed = torch.nn.functional.cross_entropy(
        scaled_forward(model, channels, x, mask + noise.detach(), 1 + noise_bias.detach()), y
    )
    return alpha * natural + (1 - alpha) * perturbed, logits


class Anp(BnMaskPruning):
    """Adversarial Neuron Pruning on the BatchNorm channels of the model (model=small_cnn_bn).

    For `iterations` batches of `batch_size` holdout images drawn with replacement: perturb every
    channel's gamma by a factor (mask + delta) and its beta by (1 + xi), delta and xi from U(-eps,
    eps) then `steps` signed-gradient ascent steps on the clean loss; then one SGD step (lr,
    momentum) on the masks for alpha * L(mask) + (1 - alpha) * L(mask + delta, 1 + xi), masks
    clipped to [0, 1]. The model runs in training mode (batch statistics) as in mask_train; its
    weights never change. Channels are then pruned by mask value (BnMaskPruning: the holdout
    selection by default, or the authors' fixed threshold 0.2 with selection=threshold).

    Parameters (defaults from optimize_mask_cifar.py unless noted):
        eps: the perturbation budget (--anp-eps 0.4); 0 learns masks without perturbation.
        steps: ascent steps per batch (--anp-steps 1).
        alpha: weight of the natural loss (--anp-alpha 0.2).
        lr: the masks' SGD learning rate (--lr 0.2), momentum (0.9, their mask_optimizer).
        iterations: mask updates (--nb-iter 2000), batch_size (128).
        threshold: the paper's fixed pruning threshold (0.2), for selection=threshold.
    BackdoorBench (defense/anp.py, config/defense/anp/config.yaml) keeps eps, steps, alpha, lr
    and iterations, uses 5 % of the training set (ratio 0.05) instead of 1 %, batch 256, runs
    the perturbed BatchNorm in eval mode (running statistics, a forward hook), and keeps the
    threshold whose pruned model has the lowest test ASR; here: the authors' 1 % (500 images),
    batch 128, training mode, and a holdout-only choice.
    """

    name = "anp"

    def __init__(
        self,
        eps: float,
        steps: int,
        alpha: float,
        lr: float,
        momentum: float,
        iterations: int,
        **shared: Any,
    ) -> None:
        super().__init__(**shared)
        self.eps = coerce(eps, "float", "defense.eps")
        if not 0 <= self.eps <= 1:
            raise BdrunError(
                f"defense.eps={self.eps} must be in [0, 1] (a relative perturbation of each "
                "BatchNorm weight; the authors use 0.4)"
            )
        self.steps = at_least(steps, "int", "steps", 1, 1)
        self.alpha = fraction(alpha, "defense.alpha")
        self.lr = positive(lr, "lr", 0.2)
        _, self.momentum, _ = check_sgd(self.batch_size, momentum, 0.0)
        self.iterations = at_least(iterations, "int", "iterations", 1, 2000)

    def learn_masks(
        self, model: nn.Module, channels: BnChannels, clean: ImageSet, ctx: RunContext
    ) -> Tensor:
        device = ctx.device
        work = working_copy(model).to(device).train()
        mask = torch.ones(channels.total, device=device, requires_grad=True)
        noise = torch.zeros(channels.total, device=device, requires_grad=True)
        noise_bias = torch.zeros(channels.total, device=device, requires_grad=True)
        optimizer = torch.optim.SGD([mask], lr=self.lr, momentum=self.momentum)
        g = ctx.generator("anp-masks")
        perturb = self.eps > 0
        watch = DivergenceWatch(
            "ANP's mask optimisation",
            self.lr,
            self.iterations,
            unit="step",
            lr_setting="defense.lr",
        )
        batches = self.batches(clean, g, device, steps=self.iterations)
        with seeded_global(ctx.seed, "anp-masks"):  # dropout, where the model has it
            for step, (x, y) in enumerate(ctx.track(batches, "anp masks", self.iterations), 1):
                if perturb:
                    perturbation_step(
                        work, channels, x, y, mask, noise, noise_bias, self.eps, self.steps, g
                    )
                optimizer.zero_grad()
                loss, _ = anp_loss(
                    work,
                    channels,
                    x,
                    y,
                    mask,
                    noise if perturb else None,
                    noise_bias if perturb else None,
                    self.alpha,
                )
                watch.observe(loss)
                mask_step(mask, optimizer, loss)
                if step % 500 == 0 or step == self.iterations:
                    watch.check(step, [mask])
        return mask.detach()
