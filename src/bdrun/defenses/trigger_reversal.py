"""Neural Cleanse trigger reverse-engineering, many labels optimised in one batch.

Wang et al., "Neural Cleanse: Identifying and Mitigating Backdoor Attacks in Neural Networks"
(IEEE S&P 2019), Sec. IV: for each label t find the smallest mask m and a pattern p such that
(1 - m) * x + m * p is classified as t for clean x, minimising
    cross-entropy(f((1 - m) x + m p), t) + cost * |m|_1.
Defaults follow the authors' code (bolunwang/backdoor, gtsrb_visualize_example.py with
visualizer.py): Adam lr 0.1, betas (0.5, 0.9); mask and pattern in tanh space, random init;
1000 steps of 1000 samples in mini-batches of 32 (here at most one pass over a smaller clean
set per step); cost starts at 0 and is set to init_cost 1e-3 after `patience` (5) steps at
>= 99 % attack success, then multiplied by 2 after 5 successful steps in a row and divided by
2 ** 1.5 after 5 failing ones; early stop once the cost has gone both up and down and the best
mask norm has not improved for 25 steps; the result is the mask with the smallest norm among
steps that reached the success threshold.

Labels are independent problems; stacking K of them in one batch (K x batch images per forward
pass, per-label cost schedules as tensors, per-parameter Adam) gives the same optimisation per
label with far fewer, larger passes, which is what keeps 1,283-class models practical.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import time
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from bdrun.data.base import to_float
from bdrun.errors import BdrunError
from bdrun.finite import DivergenceWatch
from bdrun.models.probes import frozen_weights
from bdrun.validate import coerce

log = logging.getLogger(__name__)


@dataclass
class ReversalSettings:
    """The authors' optimisation settings (see the module docstring); the values come from
    conf/defense/neural_cleanse.yaml (`mask_lr` is `lr` here).

    steps: optimisation steps ("epochs" of samples_per_step images) at most.
    cost_multiplier: the cost goes up by it and down by it ** 1.5.
    epsilon: keeps tanh space finite (Keras' K.epsilon() in the authors' code).
    label_batch: labels optimised together (memory grows with label_batch x batch_size); None:
        one at a time on the CPU, 16 on a GPU. On 2 CPU threads 16 was 2x slower per label than
        1 for the 1,283-class DeepID (benchmarks/deepid_bench.py); batching pays where kernels
        are small.
    """

    init_cost: float
    lr: float
    beta1: float
    beta2: float
    steps: int
    samples_per_step: int
    batch_size: int
    attack_succ_threshold: float
    patience: int
    cost_multiplier: float
    early_stop: bool
    early_stop_threshold: float
    early_stop_patience: int
    epsilon: float
    label_batch: int | None

    @classmethod
    def from_config(cls, values: dict[str, Any]) -> ReversalSettings:
        """Settings from config values (numbers coerced and checked, one-line errors naming
        the `defense.` key)."""

        def key(name: str) -> str:
            return f"defense.{'mask_lr' if name == 'lr' else name}"

        kinds = {f.name: str(f.type) for f in dataclasses.fields(cls)}
        coerced = {}
        for name, value in values.items():
            kind = kinds[name].split(" |")[0]
            if kind == "bool":
                coerced[name] = bool(value)
            elif value is None and "None" in kinds[name]:
                coerced[name] = None
            else:
                coerced[name] = coerce(value, kind, key(name))
        settings = cls(**coerced)
        positive = {
            name: getattr(settings, name)
            for name in ("lr", "steps", "samples_per_step", "batch_size", "patience")
        }
        if settings.label_batch is not None:
            positive["label_batch"] = settings.label_batch
        for name, value in positive.items():
            if value <= 0:
                raise BdrunError(f"{key(name)}={value} must be > 0")
        if settings.init_cost <= 0 or settings.cost_multiplier <= 1:
            raise BdrunError("defense.init_cost must be > 0 and defense.cost_multiplier > 1")
        if not 0 < settings.attack_succ_threshold <= 1:
            raise BdrunError(
                f"defense.attack_succ_threshold={settings.attack_succ_threshold} must be in (0, 1]"
            )
        return settings

    def labels_per_pass(self, device: torch.device) -> int:
        return self.label_batch or (16 if device.type == "cuda" else 1)


@dataclass
class ReversedTriggers:
    """Per label: the best mask [K, 1, H, W] and pattern [K, C, H, W] in [0, 1], its L1 norm,
    the attack success it reached, and the steps run."""

    labels: Tensor
    masks: Tensor
    patterns: Tensor
    l1: Tensor
    success: Tensor
    steps: Tensor
    seconds: float

    def stamp(self, x: Tensor, which: Tensor) -> Tensor:
        """Float images x [N, C, H, W] with reversed trigger number which[i] stamped on x[i]."""
        mask, pattern = self.masks[which], self.patterns[which]
        return (1 - mask) * x + mask * pattern


def to_tanh(value: Tensor, epsilon: float) -> Tensor:
    return torch.atanh((value - 0.5) * (2 - epsilon))


def from_tanh(value: Tensor, epsilon: float) -> Tensor:
    return torch.tanh(value) / (2 - epsilon) + 0.5


def step_indices(n: int, count: int, g: torch.Generator) -> Tensor:
    """`count` sample indices for one step: shuffled passes over n samples, as many as needed."""
    passes = [torch.randperm(n, generator=g) for _ in range(math.ceil(count / n))]
    return torch.cat(passes)[:count]


class _Schedule:
    """The authors' per-label cost schedule and early stop, vectorised over K labels."""

    def __init__(self, k: int, s: ReversalSettings) -> None:
        self.s = s
        self.cost = torch.zeros(k, dtype=torch.float64)  # RESET_COST_TO_ZERO
        self.set_counter = torch.zeros(k, dtype=torch.long)
        self.up_counter = torch.zeros(k, dtype=torch.long)
        self.down_counter = torch.zeros(k, dtype=torch.long)
        self.up_flag = torch.zeros(k, dtype=torch.bool)
        self.down_flag = torch.zeros(k, dtype=torch.bool)
        self.best_reg = torch.full((k,), math.inf, dtype=torch.float64)
        self.early_counter = torch.zeros(k, dtype=torch.long)
        self.early_best = torch.full((k,), math.inf, dtype=torch.float64)

    def update(self, active: Tensor, acc: Tensor, reg: Tensor) -> tuple[Tensor, Tensor]:
        """One step's bookkeeping for the `active` labels; returns (improved, stopped) masks."""
        s = self.s
        success = active & (acc >= s.attack_succ_threshold)
        improved = success & (reg < self.best_reg)
        self.best_reg = torch.where(improved, reg, self.best_reg)

        stopped = torch.zeros_like(active)
        if s.early_stop:
            found = active & torch.isfinite(self.best_reg)
            stale = found & (self.best_reg >= s.early_stop_threshold * self.early_best)
            self.early_counter = torch.where(
                stale, self.early_counter + 1, torch.where(found, 0, self.early_counter)
            )
            self.early_best = torch.where(
                active, torch.minimum(self.best_reg, self.early_best), self.early_best
            )
            stopped = (
                active
                & self.up_flag
                & self.down_flag
                & (self.early_counter >= s.early_stop_patience)
            )

        # cost 0 -> init_cost after `patience` successful steps (counters and flags reset)
        zero = active & (self.cost == 0)
        self.set_counter = torch.where(
            zero & success, self.set_counter + 1, torch.where(active, 0, self.set_counter)
        )
        start = zero & (self.set_counter >= s.patience)
        self.cost = torch.where(start, s.init_cost, self.cost)
        for counter in (self.up_counter, self.down_counter):
            counter[start] = 0
        self.up_flag[start] = False
        self.down_flag[start] = False

        failing = active & ~success
        self.up_counter = torch.where(
            success, self.up_counter + 1, torch.where(active, 0, self.up_counter)
        )
        self.down_counter = torch.where(
            failing, self.down_counter + 1, torch.where(active, 0, self.down_counter)
        )
        up = active & (self.up_counter >= s.patience)
        down = active & ~up & (self.down_counter >= s.patience)
        self.up_counter[up] = 0
        self.down_counter[down] = 0
        self.cost = torch.where(up, self.cost * s.cost_multiplier, self.cost)
        self.cost = torch.where(down, self.cost / s.cost_multiplier**1.5, self.cost)
        self.up_flag |= up
        self.down_flag |= down
        return improved, stopped


def _reverse_labels(
    model: nn.Module,
    x: Tensor,
    labels: Tensor,
    s: ReversalSettings,
    g: torch.Generator,
    device: torch.device,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Optimise one batch of labels; returns (masks, patterns, l1, success, steps)."""
    k = len(labels)
    channels, height, width = x.shape[1:]
    mask_tanh = to_tanh(torch.rand(k, 1, height, width, generator=g), s.epsilon).to(device)
    pattern_tanh = to_tanh(torch.rand(k, channels, height, width, generator=g), s.epsilon).to(
        device
    )
    mask_tanh.requires_grad_(True)
    pattern_tanh.requires_grad_(True)
    optimizer = torch.optim.Adam([mask_tanh, pattern_tanh], lr=s.lr, betas=(s.beta1, s.beta2))
    schedule = _Schedule(k, s)
    best_mask = from_tanh(mask_tanh.detach(), s.epsilon).cpu()
    best_pattern = from_tanh(pattern_tanh.detach(), s.epsilon).cpu()
    best_success = torch.zeros(k, dtype=torch.float64)
    found = torch.zeros(k, dtype=torch.bool)
    active = torch.ones(k, dtype=torch.bool)
    steps = torch.zeros(k, dtype=torch.long)
    targets = labels.to(device)
    # the authors' MINI_BATCH; at most one pass over a small clean set per step
    batches = max(1, min(s.samples_per_step, len(x)) // s.batch_size)
    # the loss is cross-entropy + cost x |mask|: the cost schedule can overflow it too
    watch = DivergenceWatch(
        "Neural Cleanse's trigger reversal",
        s.lr,
        s.steps,
        "step",
        "defense.mask_lr",
        fix="lower defense.mask_lr or defense.init_cost",
    )
    for step in range(s.steps):
        rows = active.nonzero().flatten()
        if len(rows) == 0:
            break
        rows_dev = rows.to(device)
        cost = schedule.cost[rows].to(device, torch.float32)
        acc_sum = torch.zeros(len(rows), dtype=torch.float64)
        reg_sum = torch.zeros(len(rows), dtype=torch.float64)
        order = step_indices(len(x), batches * s.batch_size, g)
        for b in range(batches):
            clean = to_float(x[order[b * s.batch_size : (b + 1) * s.batch_size]].to(device))
            mask = from_tanh(mask_tanh[rows_dev], s.epsilon)  # [A, 1, H, W]
            pattern = from_tanh(pattern_tanh[rows_dev], s.epsilon)  # [A, C, H, W]
            stamped = (1 - mask[:, None]) * clean[None] + (mask * pattern)[:, None]
            logits = model(stamped.flatten(0, 1)).view(len(rows), len(clean), -1)
            wanted = targets[rows_dev][:, None].expand(-1, len(clean))
            ce = F.cross_entropy(logits.flatten(0, 1), wanted.flatten(), reduction="none")
            reg = mask.abs().flatten(1).sum(1)  # the authors' l1: sum over the (1-channel) mask
            loss = (ce.view(len(rows), -1).mean(1) + cost * reg).sum()
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            watch.observe(loss)
            with torch.no_grad():
                acc_sum += (logits.argmax(-1) == wanted).double().mean(1).cpu()
                reg_sum += reg.detach().double().cpu()
        steps[rows] += 1
        watch.check(step + 1, [mask_tanh, pattern_tanh])  # the loop reads values back anyway
        acc = torch.zeros(k, dtype=torch.float64)
        reg = torch.full((k,), math.inf, dtype=torch.float64)
        acc[rows] = acc_sum / batches
        reg[rows] = reg_sum / batches
        improved, stopped = schedule.update(active, acc, reg)
        if improved.any():
            with torch.no_grad():
                best_mask[improved] = from_tanh(mask_tanh[improved.to(device)], s.epsilon).cpu()
                best_pattern[improved] = from_tanh(
                    pattern_tanh[improved.to(device)], s.epsilon
                ).cpu()
            best_success[improved] = acc[improved]
            found |= improved
        active &= ~stopped
        if step % 10 == 0 or not active.any():
            log.info(
                "reversing labels %d-%d: step %d, %d active, success %.3f, best L1 %s",
                int(labels[0]),
                int(labels[-1]),
                step,
                int(active.sum()),
                float(acc[rows].mean()),
                [round(v, 1) for v in schedule.best_reg.tolist()],
            )
    with torch.no_grad():  # labels that never reached the threshold keep their last state
        last_mask = from_tanh(mask_tanh.detach(), s.epsilon).cpu()
        last_pattern = from_tanh(pattern_tanh.detach(), s.epsilon).cpu()
    best_mask[~found] = last_mask[~found]
    best_pattern[~found] = last_pattern[~found]
    l1 = best_mask.flatten(1).sum(1).double()
    return best_mask, best_pattern, l1, best_success, steps


def reverse_triggers(
    model: nn.Module,
    x: Tensor,
    labels: Tensor,
    settings: ReversalSettings,
    g: torch.Generator,
    device: torch.device | str = "cpu",
) -> ReversedTriggers:
    """Reverse-engineer a trigger for every label in `labels` from clean images x (any dtype),
    `settings.labels_per_pass(device)` labels at a time. The model is left unchanged and on
    `device`."""
    if len(x) == 0:
        raise BdrunError("the clean holdout set is empty; Neural Cleanse needs clean images")
    device = torch.device(device)
    started = time.perf_counter()
    model.eval().to(device)
    results = []
    with frozen_weights(model):  # only the trigger is optimised
        per_pass = settings.labels_per_pass(device)
        for start in range(0, len(labels), per_pass):
            chunk = labels[start : start + per_pass]
            results.append(_reverse_labels(model, x, chunk, settings, g, device))
    masks, patterns, l1, success, steps = (torch.cat(parts) for parts in zip(*results, strict=True))
    return ReversedTriggers(
        labels.clone(), masks, patterns, l1, success, steps, time.perf_counter() - started
    )
