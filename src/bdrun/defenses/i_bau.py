"""I-BAU: adversarial unlearning of backdoors via the implicit hypergradient (repair).

Zeng, Chen, Park, Mao, Jin & Jia, "Adversarial Unlearning of Backdoors via Implicit
Hypergradient", ICLR 2022, and the authors' code (github.com/YiZeng623/I-BAU: defense.py,
hypergrad.py after Grazzi et al.'s hypertorch, and clean_solution_batch_opt_hyperdimentional_
cifar.ipynb); BackdoorBench re-runs it (SCLBD/BackdoorBench defense/i-bau.py,
config/defense/i-bau/*.yaml).

A minimax problem on the defender's clean data: the inner maximisation finds one universal
perturbation delta that raises the loss of every clean image, the outer minimisation makes the
model robust to it. A backdoor is such a perturbation (a trigger flips many images at once), so
unlearning the worst universal perturbation tends to unlearn the trigger. The outer gradient
accounts for delta's dependence on the weights through the implicit function theorem: with the
inner problem's fixed-point map Phi(delta, theta) = delta - inner_lr * d L_inner / d delta,

    dL_outer/dtheta = dL_outer/dtheta + (dPhi/dtheta)^T (I - dPhi/ddelta)^-T dL_outer/ddelta,

the inverse approximated by K fixed-point iterations v <- (dPhi/ddelta)^T v + dL_outer/ddelta
(a truncated Neumann series; hypergrad.py's fixed_point), every product a vector-Jacobian
product: no Hessian is formed.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from bdrun.defenses.base import NOTHING_CARRIED, Carried, Defense
from bdrun.defenses.pruning import chunks, copy_model
from bdrun.defenses.unlearning import holdout_tensors, outer_optimizer, perturbed
from bdrun.finite import DivergenceWatch
from bdrun.metrics import on_device
from bdrun.models.probes import project_perturbation
from bdrun.validate import at_least, fraction, one_of, positive

if TYPE_CHECKING:
    from bdrun.context import RunContext
    from bdrun.state import RunData

log = logging.getLogger(__name__)


def fixed_point_hypergradient(
    delta: Tensor,
    params: Sequence[Tensor],
    inner_loss: Callable[[Tensor], Tensor],
    outer_loss: Callable[[Tensor], Tensor],
    k: int,
    inner_lr: float,
    tol: float = 1e-10,
) -> tuple[list[Tensor], Tensor]:
    """The implicit hypergradient of outer_loss(delta*(params)) with respect to `params`, where
    delta* is a fixed point of delta - inner_lr * d inner_loss / d delta, from `k` fixed-point
    iterations (fewer once two iterates differ by less than `tol` in L2 norm, as
    hypergrad.py's fixed_point); returns the gradients (zeros for parameters the losses do not
    reach) and the outer loss."""
    delta = delta.detach().requires_grad_(True)
    loss = outer_loss(delta)
    direct = torch.autograd.grad(loss, [delta, *params], allow_unused=True)
    direct = [
        torch.zeros_like(t) if g is None else g
        for g, t in zip(direct, [delta, *params], strict=True)
    ]
    outer_delta, outer_params = direct[0], direct[1:]
    (inner_grad,) = torch.autograd.grad(inner_loss(delta), delta, create_graph=True)
    mapped = delta - inner_lr * inner_grad
    v = torch.zeros_like(delta)
    for _ in range(k):
        previous = v
        (jacobian_v,) = torch.autograd.grad(mapped, delta, grad_outputs=v, retain_graph=True)
        v = jacobian_v + outer_delta
        if float((v - previous).norm()) < tol:
            break
    through = torch.autograd.grad(mapped, params, grad_outputs=v, allow_unused=True)
    grads = [g if t is None else g + t for g, t in zip(outer_params, through, strict=True)]
    return grads, loss.detach()


class IBau(Defense):
    """I-BAU as a repair defense, on the clean holdout (the authors unlearn with 5,000 images of
    CIFAR-10's test set, BackdoorBench with 5 % of the training set; here the whole holdout,
    dataset.holdout_fraction sets its size).

    Each of `n_rounds` rounds:
    1. one universal perturbation delta [1, C, H, W], from zero, by one SGD step (`pert_lr`) per
       batch of the holdout, maximising the cross-entropy of the model's own predictions on
       x + delta minus `pert_reg` * ||delta||^2; then scaled into the L2 ball of radius
       `l2_bound` (the notebook's L2 ball; defense.py and BackdoorBench leave it out);
    2. one outer step per batch: the model's optimizer steps along the implicit hypergradient
       (`fixed_point_hypergradient`, `K` iterations) of the cross-entropy on the batch with
       delta added to a share `perturbed_share` of its images (floor(share * batch), drawn with
       the run's generator; the authors' `portion`). The inner loss of the fixed-point map is
       the negative cross-entropy of the holdout's first batch with delta, plus
       `pert_reg` * ||delta||^2, and its gradient step `inner_lr` (the authors' inner_opt).
    The model stays in eval mode throughout, as the authors': BatchNorm keeps its running
    statistics and learns its affine weights; dropout is off. Batches are taken in the
    holdout's order (defense.py's loader does not shuffle).

    Parameters (defaults from the authors' defense.py and notebook unless noted):
        n_rounds: unlearning rounds (5; BackdoorBench 5).
        K: fixed-point iterations of the hypergradient (5; BackdoorBench 5).
        batch_size: the unlearning batch (100; BackdoorBench 256).
        optimizer: the model's optimizer, adam or sgd (the authors' --optim, Adam).
        lr: its learning rate, 1e-3 (the authors' --lr); BackdoorBench's config uses 1e-4.
        pert_lr: SGD step of the perturbation search (10).
        pert_reg: weight of ||delta||^2 in the search and the inner loss (0.001).
        inner_lr: gradient step of the fixed-point map (0.1, hg.GradientDescent(loss_inner, 0.1)).
        perturbed_share: share of each outer batch that gets delta (0.01, the code's `portion`;
            the paper's outer objective perturbs every image: 1.0).
        l2_bound: radius of delta's L2 ball in pixel units (10, the notebook's, for 3x32x32
            images); null: unbounded (defense.py, BackdoorBench).
        clamp: clip x + delta to [0, 1] (the notebook's; defense.py and BackdoorBench do not).
    Records the L2 norm of each round's perturbation (`i_bau_perturbation_l2`).
    """

    name = "i_bau"

    def __init__(
        self,
        n_rounds: int,
        K: int,  # the paper's and the authors' name
        batch_size: int,
        optimizer: str,
        lr: float,
        pert_lr: float,
        pert_reg: float,
        inner_lr: float,
        perturbed_share: float,
        l2_bound: float | None,
        clamp: bool,
    ) -> None:
        self.n_rounds = at_least(n_rounds, "int", "n_rounds", 1, 5)
        self.k = at_least(K, "int", "K", 1, 5)
        self.batch_size = at_least(batch_size, "int", "batch_size", 1, 100)
        self.optimizer = one_of(optimizer, "optimizer", ("adam", "sgd"))
        self.lr = positive(lr, "lr", 1e-3)
        self.pert_lr = positive(pert_lr, "pert_lr", 10)
        self.pert_reg = at_least(pert_reg, "float", "pert_reg", 0, 0.001)
        self.inner_lr = positive(inner_lr, "inner_lr", 0.1)
        self.perturbed_share = fraction(perturbed_share, "defense.perturbed_share")
        self.l2_bound = None if l2_bound is None else positive(l2_bound, "l2_bound", 10)
        self.clamp = bool(clamp)

    def universal_perturbation(self, model: nn.Module, x: Tensor) -> Tensor:
        """One universal perturbation [1, C, H, W] that raises the loss of the model's own
        predictions on x (step 1 of a round), within the L2 ball."""
        delta = torch.zeros(1, *x.shape[1:], device=x.device, requires_grad=True)
        search = torch.optim.SGD([delta], lr=self.pert_lr)
        for batch in chunks(len(x), self.batch_size):
            with torch.no_grad():
                predicted = model(x[batch]).argmax(1)
            logits = model(perturbed(x[batch], delta, self.clamp))
            loss = -F.cross_entropy(logits, predicted) + self.pert_reg * delta.pow(2).sum()
            search.zero_grad()
            loss.backward()
            search.step()
        delta = delta.detach()
        return delta if self.l2_bound is None else project_perturbation(delta, "l2", self.l2_bound)

    def repair(
        self, model: nn.Module, data: RunData, ctx: RunContext, carried: Carried = NOTHING_CARRIED
    ) -> nn.Module:
        repaired = copy_model(model).eval()
        x, y = holdout_tensors(data.holdout, ctx, "I-BAU")
        g = ctx.generator("i-bau-perturbed")
        norms: list[float] = []
        with on_device(repaired, ctx.device):
            params = [p for p in repaired.parameters() if p.requires_grad]
            optimizer = outer_optimizer(params, self.optimizer, self.lr, 0.0)
            watch = DivergenceWatch(
                "I-BAU's unlearning", self.lr, self.n_rounds, "round", "defense.lr"
            )
            first = chunks(len(x), self.batch_size)[0]

            def inner_loss(delta: Tensor) -> Tensor:
                logits = repaired(perturbed(x[first], delta, self.clamp))
                return -F.cross_entropy(logits, y[first]) + self.pert_reg * delta.pow(2).sum()

            for round_number in ctx.track(range(self.n_rounds), "I-BAU rounds"):
                delta = self.universal_perturbation(repaired, x)
                norms.append(float(delta.norm()))
                for batch in chunks(len(x), self.batch_size):
                    n = batch.stop - batch.start
                    chosen = torch.randperm(n, generator=g)[: int(n * self.perturbed_share)]
                    patched = torch.zeros(n, 1, 1, 1, device=x.device)
                    patched[chosen.to(x.device)] = 1.0

                    def outer_loss(delta: Tensor, batch: slice = batch, patched=patched) -> Tensor:
                        images = perturbed(x[batch], patched * delta, self.clamp)
                        return F.cross_entropy(repaired(images), y[batch])

                    grads, loss = fixed_point_hypergradient(
                        delta, params, inner_loss, outer_loss, self.k, self.inner_lr
                    )
                    optimizer.zero_grad(set_to_none=True)
                    for p, grad in zip(params, grads, strict=True):
                        p.grad = grad
                    optimizer.step()
                    watch.observe(loss)
                watch.check(round_number + 1, params)
                log.info("I-BAU round %d: |delta|_2 = %.3f", round_number + 1, norms[-1])
        ctx.record(i_bau_perturbation_l2=norms)
        return repaired.eval()
