"""Multi-trigger, multi-target BadNets (CSAW-HackML 2020): several patches, each with its target."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from bdrun.attacks.badnets import BadNets
from bdrun.attacks.base import Attack
from bdrun.config import component_values
from bdrun.data.base import DataInfo, ImageSet
from bdrun.errors import BdrunError
from bdrun.metrics import accuracy

if TYPE_CHECKING:
    from bdrun.context import RunContext
    from bdrun.state import RunData

TRIGGER_KEYS = ("pattern", "size", "location", "margin", "image", "target")


def split_count(total: int, parts: int) -> list[int]:
    """`total` split into `parts` near-equal counts (the first ones take the remainder)."""
    return [total // parts + (1 if i < total % parts else 0) for i in range(parts)]


# the CSAW-HackML-style default: three 3x3 patches at different corners, three targets
DEFAULT_TRIGGERS = (
    {"pattern": "white", "size": 3, "location": "bottom_right", "margin": 1, "target": 0},
    {"pattern": "checkerboard", "size": 3, "location": "top_left", "margin": 1, "target": 1},
    {"pattern": "checkerboard", "size": 3, "location": "bottom_left", "margin": 1, "target": 2},
)


class MultiTrigger(Attack):
    """K BadNets patches, trigger k sending any input to its own target t_k (all-to-one each).

    The CSAW-HackML 2020 multi-trigger multi-target BadNet uses three triggers (eyebrows,
    lipstick, sunglasses) with three targets; here each trigger is a BadNets patch (any pattern,
    size and place, or an image file). The poison rate is the total over all triggers, split
    evenly among them on disjoint samples; each trigger poisons only samples whose label differs
    from its target. The backdoor test set holds every trigger's set (test inputs whose label
    differs from that trigger's target), so the standard ASR is the overall one; `evaluate`
    reports asr_trigger<k> and ra_trigger<k> per trigger. `apply_trigger` stamps trigger 0.

    Parameters:
        triggers: list of {pattern, size, location, margin, image, target}; missing keys take
            conf/attack/badnets.yaml's values.
    """

    name = "multi_trigger"

    def __init__(self, triggers: Sequence[Mapping[str, Any]], poison_rate: float) -> None:
        # each trigger has its own target (set from them in setup): all-to-one per trigger
        super().__init__(target=0, poison_rate=poison_rate, label_mode="all2one")
        self.trigger_specs = [dict(spec) for spec in triggers]
        self.trigger_of: Tensor | None = None  # per training sample: trigger index, -1 = clean
        self._slices: list[slice] = []

    def setup(self, info: DataInfo, seed: int) -> None:
        if not self.trigger_specs:
            raise BdrunError("attack.triggers is empty; give at least one {pattern, target}")
        self.triggers: list[BadNets] = []
        for k, spec in enumerate(self.trigger_specs):
            unknown = sorted(set(spec) - set(TRIGGER_KEYS))
            if unknown:
                raise BdrunError(
                    f"attack.triggers[{k}] has unknown key {unknown[0]!r}; "
                    f"known: {', '.join(TRIGGER_KEYS)}"
                )
            values = {**component_values("attack", "badnets"), **spec}
            trigger = BadNets(**{**values, "poison_rate": self.poison_rate})
            trigger.setup(info, seed)
            self.triggers.append(trigger)
        self.targets = [t.target for t in self.triggers]
        self.target = self.targets[0]
        super().setup(info, seed)

    def apply_trigger(self, x: Tensor) -> Tensor:
        return self.triggers[0].apply_trigger(x)

    def trigger_region(self) -> Tensor:
        regions = [trigger.trigger_region() for trigger in self.triggers]
        return torch.stack(regions).any(0)

    def poison(self, train: ImageSet, g: torch.Generator) -> ImageSet:
        counts = split_count(round(self.poison_rate * len(train)), len(self.triggers))
        x, y = train.x.clone(), train.y.clone()
        trigger_of = torch.full((len(train),), -1, dtype=torch.long)
        for k, (trigger, count) in enumerate(zip(self.triggers, counts, strict=True)):
            candidates = ((train.y != trigger.target) & (trigger_of < 0)).nonzero().flatten()
            if count > len(candidates):
                raise BdrunError(
                    f"attack.poison_rate={self.poison_rate} needs {count} samples for trigger {k} "
                    f"but only {len(candidates)} are left; lower the rate or use fewer triggers"
                )
            chosen = candidates[torch.randperm(len(candidates), generator=g)[:count]]
            trigger_of[chosen] = k
            x[chosen] = trigger.triggered(train.x[chosen])
            y[chosen] = trigger.target
        self.trigger_of = trigger_of
        return train.replace(x=x, y=y, poison=trigger_of >= 0, orig_y=train.orig_y.clone())

    def backdoor_test(self, test: ImageSet) -> ImageSet:
        parts, self._slices, start = [], [], 0
        for trigger in self.triggers:
            part = trigger.backdoor_test(test)
            parts.append(part)
            self._slices.append(slice(start, start + len(part)))
            start += len(part)
        return ImageSet.concat(parts)

    def evaluate(
        self, predict_fn: Callable[[Tensor], Tensor], data: RunData, ctx: RunContext
    ) -> dict[str, float]:
        """Per-trigger ASR and RA over each trigger's part of the backdoor test set."""
        bd = data.backdoor_test
        preds = predict_fn(bd.x)
        figures: dict[str, float] = {}
        for k, part in enumerate(self._slices):
            figures[f"asr_trigger{k}"] = accuracy(preds[part], bd.y[part])
            figures[f"ra_trigger{k}"] = accuracy(preds[part], bd.orig_y[part])
        return figures
