"""The run's data once the attack stage has ended: built once by the runner, then frozen.

Defenses receive it as an argument. Nothing in it refers back to the attack: the poison mask and
original labels of `train` are ground truth for scoring filters, never an input to a defense's
decisions; `test` and `backdoor_test` are for scoring and figures only.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor

from bdrun.data.base import DataInfo, ImageSet


@dataclass(frozen=True)
class RunData:
    """The frozen data of one run.

    info: name, shape, classes and normalisation of the data set.
    train: the poisoned training set (`poison` = ground-truth mask, `orig_y` = true labels).
    holdout: clean training data the defender may use (never poisoned).
    test: the clean test set (CCA).
    backdoor_test: test inputs whose backdoor label differs from their true label, with the
        trigger applied; `y` = backdoor label (ASR), `orig_y` = true label (RA).
    cover: bool mask over `train` of the attack's cover samples (trigger, true label; see
        bdrun.attacks.base.Attack.cover), or None; ground truth for scoring, like `poison`.
    """

    info: DataInfo
    train: ImageSet
    holdout: ImageSet
    test: ImageSet
    backdoor_test: ImageSet
    cover: Tensor | None = None
