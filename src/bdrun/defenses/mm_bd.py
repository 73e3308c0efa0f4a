"""MM-BD: flag a model whose largest achievable class margin is an outlier (data-free).

Wang, Xiang, Miller and Kesidis, "MM-BD: Post-Training Detection of Backdoor Attacks with
Arbitrary Backdoor Pattern Types Using a Maximum Margin Statistic" (IEEE S&P 2024). Defaults
from the authors' code (wanghangpsu/MM-BD, univ_bd.py):

1. For every class c, `images_per_class` (30) inputs are drawn uniformly in [0, 1] and optimised
   by SGD (`lr` 1e-2, `momentum` 0.2, at most `steps` 300 steps, stopped when the summed loss
   changes by less than `tolerance` 1e-5 relative) to maximise the margin
   logit_c - max_{k != c} logit_k of the model on the clamped inputs. Class c's statistic is the
   largest margin reached. A backdoor target's margin is unusually large: the trigger drives
   its logit far above the others wherever it is stamped.
2. Null distribution: a Gamma distribution fitted (scipy's maximum likelihood) to the statistics
   of every class but the largest. The p-value of the largest statistic r is the chance that
   the largest of K = num_classes draws from the null exceeds it, 1 - F(r)^K, computed in the
   tail from the survival function so that tiny p-values stay distinct.
3. The model is flagged (its target: the class of the largest statistic) when p < `p_value`
   (0.05, the authors' threshold).

No data is used: the inputs start from noise drawn from the run's `mm-bd` stream. Report:
`margins` per class, `p_value`; `anomaly_index` per class is the statistic's distance from the
median in consistency-scaled MADs (what the authors print beside the p-value). The model-level
score is -log10(p) (capped at 300): higher = more likely backdoored, and it keeps ranking
models whose p-values all fall below the threshold. The defense inspects only.
"""

from __future__ import annotations

import math
import time
from typing import TYPE_CHECKING

import torch
from torch import Tensor, nn

from bdrun.defenses.anomaly import CONSISTENCY
from bdrun.defenses.base import Defense, Verdict
from bdrun.finite import DivergenceWatch
from bdrun.models.probes import frozen_weights
from bdrun.validate import at_least, coerce, fraction, positive

if TYPE_CHECKING:
    from bdrun.context import RunContext
    from bdrun.state import RunData

SCORE_CAP = 300.0  # -log10 of the smallest p-value reported (float64 underflows near 1e-308)


def margins(logits: Tensor, labels: Tensor) -> Tensor:
    """logit of `labels` minus the largest other logit, per row."""
    own = logits.gather(1, labels[:, None]).squeeze(1)
    others = logits.scatter(1, labels[:, None], float("-inf"))
    return own - others.amax(1)


def max_margins(
    model: nn.Module,
    in_shape: tuple[int, ...],
    num_classes: int,
    images_per_class: int,
    steps: int,
    lr: float,
    momentum: float,
    tolerance: float,
    g: torch.Generator,
    device: torch.device | str = "cpu",
) -> tuple[Tensor, Tensor]:
    """(largest margin per class, optimisation steps per class): every class's inputs are
    optimised together in one batch, each class stopping on its own loss's relative change."""
    device = torch.device(device)
    images = torch.rand(num_classes * images_per_class, *in_shape, generator=g).to(device)
    images.requires_grad_(True)
    labels = torch.arange(num_classes, device=device).repeat_interleave(images_per_class)
    optimizer = torch.optim.SGD([images], lr=lr, momentum=momentum)
    active = torch.ones(num_classes, dtype=torch.bool, device=device)
    last = torch.full((num_classes,), float("inf"), dtype=torch.float64, device=device)
    used = torch.zeros(num_classes, dtype=torch.long)
    watch = DivergenceWatch("MM-BD's margin maximisation", lr, steps, "step", "defense.lr")
    model.eval().to(device)
    with frozen_weights(model):
        for step in range(steps):
            optimizer.zero_grad()
            margin = margins(model(images.clamp(0, 1)), labels)
            per_class = -margin.view(num_classes, images_per_class).sum(1)
            watch.observe(per_class.sum())
            (per_class * active).sum().backward()
            images.grad[~active.repeat_interleave(images_per_class)] = 0
            optimizer.step()
            loss = per_class.detach().double()
            used[active.cpu()] = step + 1
            change = (last - loss).abs() / last.abs()
            active &= ~(change < tolerance)
            last = loss
            if not active.any():
                break
        watch.check(int(used.max()), [])
        with torch.no_grad():
            final = margins(model(images.clamp(0, 1)), labels)
    return final.view(num_classes, images_per_class).amax(1).double().cpu(), used


def gamma_p_value(statistics: Tensor) -> float:
    """The authors' p-value of the largest statistic under a Gamma fitted to the others:
    1 - F(r)^K with K the number of classes, from the survival function. A null whose fit
    fails (all values equal, too few classes) gives 1 (nothing to flag)."""
    import numpy as np
    from scipy.stats import gamma

    values = statistics.double().numpy()
    largest = int(values.argmax())
    null = np.delete(values, largest)
    if len(null) < 2 or np.ptp(null) == 0:
        return 1.0
    try:
        with np.errstate(all="ignore"):
            shape, loc, scale = gamma.fit(null)
            survival = float(gamma.sf(values[largest], shape, loc=loc, scale=scale))
    except (ValueError, RuntimeError, FloatingPointError):
        return 1.0
    if not math.isfinite(survival):
        return 1.0
    return float(-math.expm1(len(values) * math.log1p(-min(survival, 1.0))))


def mad_index(statistics: Tensor) -> Tensor:
    """|statistic - median| / (1.4826 x MAD): the index the authors print."""
    values = statistics.double()
    median = values.median()
    mad = CONSISTENCY * (values - median).abs().median()
    return torch.zeros_like(values) if mad == 0 else (values - median).abs() / mad


class MMBD(Defense):
    """Maximum-margin backdoor detection (see the module docstring).

    Parameters:
        images_per_class: random inputs optimised per class (univ_bd.py: 30).
        steps: SGD steps at most (NSTEP 300); debug=smoke: budget.reverse_steps.
        lr, momentum: SGD's (1e-2, 0.2).
        tolerance: stop a class once its summed loss changes by less than this, relatively.
        p_value: flag the model when the largest margin's p-value is below it (0.05).
    """

    def __init__(
        self,
        images_per_class: int,
        steps: int,
        lr: float,
        momentum: float,
        tolerance: float,
        p_value: float,
    ) -> None:
        self.images_per_class = at_least(images_per_class, "int", "images_per_class", 1, 30)
        self.steps = at_least(steps, "int", "steps", 1, 300)
        self.lr = positive(lr, "lr", 0.01)
        self.momentum = at_least(momentum, "float", "momentum", 0, 0.2)
        self.tolerance = coerce(tolerance, "float", "defense.tolerance")
        self.p_value = fraction(p_value, "defense.p_value")

    def analyse(self, model: nn.Module, ctx: RunContext) -> Verdict:
        started = time.perf_counter()
        statistics, used = max_margins(
            model,
            tuple(ctx.info.shape),
            ctx.info.num_classes,
            self.images_per_class,
            self.steps,
            self.lr,
            self.momentum,
            self.tolerance,
            ctx.generator("mm-bd"),
            ctx.device,
        )
        model.to("cpu")
        p = gamma_p_value(statistics)
        target = int(statistics.argmax())
        flagged = [target] if p < self.p_value else []
        ctx.record(
            margins=statistics.tolist(),
            p_value=p,
            p_value_threshold=self.p_value,
            margin_steps=used.tolist(),
            margin_s=time.perf_counter() - started,
        )
        score = SCORE_CAP if p <= 0 else min(SCORE_CAP, -math.log10(p))
        return Verdict(flagged, mad_index(statistics).tolist(), score)

    def inspect_model(self, model: nn.Module, data: RunData, ctx: RunContext) -> Verdict:
        """Inspect the model without data (the holdout is not read)."""
        return self.analyse(model, ctx)
