"""K-Arm: trigger reversal for the likeliest (target, victims) arms, scheduled as a bandit.

Shen, Liu, Tao, An, Xu, Cheng, Ma and Zhang, "Backdoor Scanning for Deep Neural Networks
through K-Arm Optimization" (ICML 2021). Defaults from the authors' main.py
(PurduePAML/K-ARM_Backdoor_Optimization; the stored snapshot holds main.py's arguments, the
algorithm follows the paper, Sec. 3-4):

1. Pre-screening on the clean holdout: each image's top k = max(1, round(`gamma` x classes))
   labels other than its own (gamma 0.25). A label t in the top k of more than `global_theta`
   (0.95) of the images of every other class is a label-universal arm (t; all other classes);
   otherwise a pair whose target t is in the top k of more than `local_theta` (0.9) of the
   images of victim class s is a label-specific arm (t; s). Universal arms win when any exist;
   a model with no arm is called clean.
2. Each arm owns a Neural-Cleanse-style trigger (mask and pattern in tanh space, Adam `lr` 0.1
   with Neural Cleanse's betas) minimising cross-entropy(f((1-m) x + m p), t) + cost x |m|_1
   on its victims' images, with Neural Cleanse's cost schedule (`init_cost` 1e-3 once the
   trigger works `patience` 5 steps, up by `cost_multiplier` 1.5 after 5 successes, down by
   1.5 ** 1.5 after 5 failures; success = `attack_succ_threshold` 0.99 of the batch).
3. The bandit: every arm is optimised `warmup_rounds` (2) rounds, then `rounds` (60) more
   rounds go, epsilon-greedily (`epsilon` 0.3), to the arm whose working trigger is smallest
   so far (arms with none yet rank after those that have one). A round is `round_steps` Adam
   steps on batches of `batch_size` (32) images.
4. Decision: the smallest working trigger's mask L1 as a share of the image's pixels; the model
   is flagged (target t) when it is below the authors' bound for its arm's kind, taken as a
   share of their 224 x 224 inputs: `global_bound` 1720 / 224^2 for universal arms,
   `local_bound` 1000 / 224^2 for label-specific ones. The authors' symmetric check of
   label-specific arms (reverse the pair, compare sizes) is left out.

Report: `arm_kind` (universal | specific | none), `arms` with each arm's rounds and trigger
share, `trigger_share`. Model-level score: 1 - trigger share (0 when no arm found a working
trigger): higher = smaller trigger = more likely backdoored. `anomaly_index` per label: 1 - the
smallest working trigger share of the arms targeting it (0 for other labels). Inspects only.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from bdrun.data.base import to_float
from bdrun.defenses.base import Defense, Verdict, require_holdout
from bdrun.defenses.trigger_reversal import from_tanh, to_tanh
from bdrun.finite import DivergenceWatch
from bdrun.metrics import on_device
from bdrun.models.probes import frozen_weights
from bdrun.validate import at_least, fraction, positive

if TYPE_CHECKING:
    from bdrun.context import RunContext
    from bdrun.state import RunData

EPSILON = 1e-7  # keeps tanh space finite (as Neural Cleanse's reversal)
BETAS = (0.5, 0.9)  # Neural Cleanse's Adam betas, which K-Arm's optimisation builds on


@dataclass(frozen=True)
class Arm:
    """A backdoor hypothesis: a trigger that sends images of `victims` to `target`."""

    target: int
    victims: tuple[int, ...]
    kind: str  # "universal" | "specific"


def pre_screen(
    logits: Tensor, y: Tensor, num_classes: int, gamma: float, global_theta: float,
    local_theta: float,
) -> list[Arm]:  # fmt: skip
    """The arms pre-screening keeps (see the module docstring), universal ones if any."""
    k = max(1, min(num_classes - 1, round(gamma * num_classes)))
    others = logits.scatter(1, y[:, None], float("-inf"))  # an image's own label never counts
    in_top = torch.zeros_like(logits, dtype=torch.bool)
    in_top.scatter_(1, others.topk(k, dim=1).indices, True)
    present = [c for c in range(num_classes) if bool((y == c).any())]
    universal, specific = [], []
    for t in range(num_classes):
        victims = tuple(c for c in present if c != t)
        if not victims:
            continue
        if float(in_top[y != t, t].double().mean()) > global_theta:
            universal.append(Arm(t, victims, "universal"))
            continue
        for s in victims:
            if float(in_top[y == s, t].double().mean()) > local_theta:
                specific.append(Arm(t, (s,), "specific"))
    return universal or specific


@dataclass
class ArmState:
    """One arm's trigger under optimisation and its Neural Cleanse cost schedule."""

    mask_tanh: Tensor
    pattern_tanh: Tensor
    optimizer: torch.optim.Optimizer
    cost: float = 0.0
    cost_set: int = 0
    up: int = 0
    down: int = 0
    rounds: int = 0
    best_l1: float = math.inf
    best_mask: Tensor | None = field(default=None, repr=False)

    def mask(self) -> Tensor:
        return from_tanh(self.mask_tanh, EPSILON)

    def pattern(self) -> Tensor:
        return from_tanh(self.pattern_tanh, EPSILON)


class KArm(Defense):
    """K-Arm backdoor scanning (see the module docstring).

    Parameters:
        gamma, global_theta, local_theta: pre-screening (main.py: 0.25, 0.95, 0.9).
        lr, batch_size, init_cost, patience, cost_multiplier, attack_succ_threshold: the
            per-arm optimisation (main.py: 0.1, 32, 1e-3, 5, 1.5, 0.99).
        rounds, warmup_rounds, epsilon: the bandit (main.py: 60, 2, 0.3); debug=smoke:
            budget.reverse_steps rounds.
        round_steps: Adam steps per round (bdrun's unit of a round).
        global_bound, local_bound: the flagging bounds as shares of the image's pixels.
        max_samples: holdout images used (null: all).
    """

    def __init__(
        self,
        gamma: float,
        global_theta: float,
        local_theta: float,
        lr: float,
        batch_size: int,
        init_cost: float,
        patience: int,
        cost_multiplier: float,
        attack_succ_threshold: float,
        rounds: int,
        warmup_rounds: int,
        round_steps: int,
        epsilon: float,
        global_bound: float,
        local_bound: float,
        max_samples: int | None,
    ) -> None:
        self.gamma = fraction(gamma, "defense.gamma")
        self.global_theta = fraction(global_theta, "defense.global_theta")
        self.local_theta = fraction(local_theta, "defense.local_theta")
        self.lr = positive(lr, "lr", 0.1)
        self.batch_size = at_least(batch_size, "int", "batch_size", 1, 32)
        self.init_cost = positive(init_cost, "init_cost", 1e-3)
        self.patience = at_least(patience, "int", "patience", 1, 5)
        self.cost_multiplier = at_least(cost_multiplier, "float", "cost_multiplier", 1, 1.5)
        self.attack_succ_threshold = fraction(
            attack_succ_threshold, "defense.attack_succ_threshold"
        )
        self.rounds = at_least(rounds, "int", "rounds", 0, 60)
        self.warmup_rounds = at_least(warmup_rounds, "int", "warmup_rounds", 1, 2)
        self.round_steps = at_least(round_steps, "int", "round_steps", 1, 10)
        self.epsilon = fraction(epsilon, "defense.epsilon")
        self.global_bound = fraction(global_bound, "defense.global_bound")
        self.local_bound = fraction(local_bound, "defense.local_bound")
        self.max_samples = (
            None if max_samples is None else at_least(max_samples, "int", "max_samples", 1, 500)
        )

    def new_arm(self, shape: tuple[int, ...], g: torch.Generator, device: torch.device) -> ArmState:
        channels, height, width = shape
        mask = to_tanh(torch.rand(1, height, width, generator=g), EPSILON).to(device)
        pattern = to_tanh(torch.rand(channels, height, width, generator=g), EPSILON).to(device)
        mask.requires_grad_(True)
        pattern.requires_grad_(True)
        optimizer = torch.optim.Adam([mask, pattern], lr=self.lr, betas=BETAS)
        return ArmState(mask, pattern, optimizer)

    def step_cost(self, state: ArmState, success: bool) -> None:
        """Neural Cleanse's cost schedule, one step."""
        if state.cost == 0:
            state.cost_set = state.cost_set + 1 if success else 0
            if state.cost_set >= self.patience:
                state.cost = self.init_cost
            return
        state.up, state.down = (state.up + 1, 0) if success else (0, state.down + 1)
        if state.up >= self.patience:
            state.up, state.cost = 0, state.cost * self.cost_multiplier
        elif state.down >= self.patience:
            state.down, state.cost = 0, state.cost / self.cost_multiplier**1.5

    def run_round(
        self, model: nn.Module, arm: Arm, state: ArmState, x: Tensor, g: torch.Generator,
        watch: DivergenceWatch,
    ) -> None:  # fmt: skip
        """`round_steps` Adam steps of one arm's trigger on random batches of its images."""
        target = torch.full((min(self.batch_size, len(x)),), arm.target, device=x.device)
        for _ in range(self.round_steps):
            batch = x[torch.randperm(len(x), generator=g)[: len(target)].to(x.device)]
            mask, pattern = state.mask(), state.pattern()
            logits = model((1 - mask) * batch + mask * pattern)
            l1 = mask.sum()
            loss = F.cross_entropy(logits, target) + state.cost * l1
            watch.observe(loss)
            state.optimizer.zero_grad()
            loss.backward()
            state.optimizer.step()
            success = float((logits.argmax(1) == target).double().mean())
            working = success >= self.attack_succ_threshold
            size = max(0.0, float(l1.detach()))  # from_tanh reaches a hair below 0
            if working and size < state.best_l1:
                state.best_l1, state.best_mask = size, mask.detach().cpu()
            self.step_cost(state, working)
        state.rounds += 1

    def analyse(self, model: nn.Module, holdout: Any, ctx: RunContext) -> Verdict:
        require_holdout(holdout, 2, "K-Arm")
        started = time.perf_counter()
        sample = holdout.random_subset(self.max_samples, ctx.generator("k-arm-samples"))
        x_all, y_all = to_float(sample.x), sample.y
        classes = ctx.info.num_classes
        device = ctx.device
        batch = ctx.settings.eval_batch_size
        model.eval()
        with on_device(model, device), torch.no_grad():
            logits = torch.cat(
                [model(x_all[i : i + batch].to(device)).float().cpu()
                 for i in range(0, len(x_all), batch)]
            )  # fmt: skip
        arms = pre_screen(logits, y_all, classes, self.gamma, self.global_theta, self.local_theta)
        g = ctx.generator("k-arm")
        states: list[ArmState] = []
        total = len(arms) * self.warmup_rounds + (self.rounds if arms else 0)
        watch = DivergenceWatch(
            "K-Arm's trigger optimisation", self.lr, total, "round", "defense.lr"
        )
        with frozen_weights(model), on_device(model, device):
            images = [
                x_all[torch.isin(y_all, torch.tensor(arm.victims))].to(device) for arm in arms
            ]
            states = [self.new_arm(tuple(ctx.info.shape), g, device) for _ in arms]
            schedule = [i for _ in range(self.warmup_rounds) for i in range(len(arms))]
            for number in range(total):
                if number < len(schedule):
                    chosen = schedule[number]
                elif float(torch.rand((), generator=g)) < self.epsilon:
                    chosen = int(torch.randint(len(arms), (), generator=g))
                else:
                    chosen = min(range(len(arms)), key=lambda i: states[i].best_l1)
                self.run_round(model, arms[chosen], states[chosen], images[chosen], g, watch)
                watch.check(number + 1, [states[chosen].mask_tanh])
        pixels = ctx.info.shape[1] * ctx.info.shape[2]
        shares = [s.best_l1 / pixels for s in states]
        best = min(range(len(arms)), key=lambda i: shares[i]) if arms else None
        found = best is not None and math.isfinite(shares[best])
        share = shares[best] if found else 1.0
        per_label = [0.0] * classes
        for arm, arm_share in zip(arms, shares, strict=True):
            if math.isfinite(arm_share):
                per_label[arm.target] = max(per_label[arm.target], 1 - arm_share)
        flagged: list[int] = []
        if found:
            arm = arms[best]
            bound = self.global_bound if arm.kind == "universal" else self.local_bound
            if share < bound:
                flagged = [arm.target]
        ctx.record(
            arm_kind=arms[0].kind if arms else "none",
            arms=[
                {
                    "target": arm.target,
                    "victims": list(arm.victims),
                    "rounds": state.rounds,
                    "trigger_share": arm_share if math.isfinite(arm_share) else None,
                }
                for arm, state, arm_share in zip(arms, states, shares, strict=True)
            ],
            trigger_share=share if found else None,
            k_arm_s=time.perf_counter() - started,
        )
        return Verdict(flagged, per_label, 1.0 - share if found else 0.0)

    def inspect_model(self, model: nn.Module, data: RunData, ctx: RunContext) -> Verdict:
        """Inspect the model on the clean holdout (the model itself is left as it is)."""
        return self.analyse(model, data.holdout, ctx)
