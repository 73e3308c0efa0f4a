"""Backdoor suppression: predict by majority vote over noisy copies of each input.

Sarkar, Alkindi and Maniatakos, "Backdoor Suppression in Neural Networks using Input Fuzzing
and Majority Voting", IEEE Design & Test 37(2), 2020. Random noise on the pixels ("fuzzing")
disturbs a small trigger more than the features of the true class, so the vote of many noisy
replicas tends towards the true label. The paper tunes the noise level per data set; so does
`noise` here.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from bdrun.defenses.base import NOTHING_CARRIED, Carried, Defense
from bdrun.errors import BdrunError
from bdrun.rng import generator

if TYPE_CHECKING:
    from bdrun.context import RunContext
    from bdrun.state import RunData

DISTRIBUTIONS = ("uniform", "gaussian")


class VotingClassifier(nn.Module):
    """Wraps a classifier: each input becomes `replicas` noisy copies, the output is the vote count
    per class (so argmax is the majority label; ties go to the lowest label).

    Noise is uniform in [-noise, noise] or Gaussian with std `noise`, added in pixel space and
    clamped to [0, 1]. All replicas of up to `images_per_pass // replicas` inputs go through the
    model in one forward pass. Each call draws its noise from a fresh seeded generator, so the
    same inputs always get the same votes.
    """

    def __init__(
        self,
        model: nn.Module,
        replicas: int,
        noise: float,
        distribution: str,
        seed: int,
        images_per_pass: int = 1024,
    ) -> None:
        super().__init__()
        self.model = model
        self.replicas = replicas
        self.noise = noise
        self.distribution = distribution
        self.seed = seed
        self.inputs_per_pass = max(1, images_per_pass // replicas)

    def _noise(self, shape: tuple[int, ...], g: torch.Generator) -> Tensor:
        if self.distribution == "uniform":
            return (torch.rand(shape, generator=g) * 2 - 1) * self.noise
        return torch.randn(shape, generator=g) * self.noise

    def forward(self, x: Tensor) -> Tensor:
        g = generator(self.seed, "suppression-noise")
        num_classes = None
        votes = []
        for start in range(0, len(x), self.inputs_per_pass):
            inputs = x[start : start + self.inputs_per_pass]
            copies = inputs.unsqueeze(1).expand(-1, self.replicas, *inputs.shape[1:])
            noise = self._noise(tuple(copies.shape), g).to(x.device, x.dtype)
            noisy = (copies + noise).clamp_(0, 1).flatten(0, 1)
            logits = self.model(noisy)
            num_classes = logits.shape[1]
            labels = logits.argmax(1).view(len(inputs), self.replicas)
            votes.append(F.one_hot(labels, num_classes).sum(1).to(x.dtype))
        if not votes:
            return x.new_zeros(0, num_classes or 0)
        return torch.cat(votes)


class Suppression(Defense):
    """Replace the model by a majority vote over `replicas` noisy copies of each input.

    Parameters:
        replicas: noisy copies per input that vote (20).
        noise: noise amplitude in pixel units ([0, 1] images): the half-width of the uniform
            distribution, or the std of the Gaussian. The paper picks it per data set; 0.1 here
            costs little clean accuracy. On Fashion-MNIST BadNets no level helps
            (docs/defenses/suppression.md): clamped noise cannot dim a saturated white patch,
            while it brightens the dark background the model knows.
        distribution: "uniform" (fuzzing with uniform random noise) or "gaussian".
    """

    name = "suppression"

    def __init__(self, replicas: int, noise: float, distribution: str) -> None:
        if int(replicas) < 1:
            raise BdrunError(f"defense.replicas={replicas} must be >= 1")
        if float(noise) < 0:
            raise BdrunError(f"defense.noise={noise} must be >= 0")
        if distribution not in DISTRIBUTIONS:
            raise BdrunError(
                f"defense.distribution={distribution!r} must be one of {', '.join(DISTRIBUTIONS)}"
            )
        self.replicas = int(replicas)
        self.noise = float(noise)
        self.distribution = distribution

    def repair(
        self, model: nn.Module, data: RunData, ctx: RunContext, carried: Carried = NOTHING_CARRIED
    ) -> nn.Module:
        return VotingClassifier(
            model,
            self.replicas,
            self.noise,
            self.distribution,
            seed=ctx.seed,
            images_per_pass=ctx.settings.eval_batch_size,
        ).eval()
