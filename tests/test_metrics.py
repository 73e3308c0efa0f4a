"""CCA / ASR / RA against hand-computed values, with a model whose predictions we choose."""

from __future__ import annotations

import math

import torch
from torch import nn

from bdrun.data.base import ImageSet
from bdrun.metrics import accuracy, attack_metrics, predict, prediction_metrics


class LookupModel(nn.Module):
    """Predicts the class stored in the first pixel of each image (as pixel * 10)."""

    def forward(self, x):
        labels = (x[:, 0, 0, 0] * 10).round().long()
        return nn.functional.one_hot(labels, 10).float()


def images(labels):
    x = torch.zeros(len(labels), 1, 2, 2)
    x[:, 0, 0, 0] = torch.tensor(labels, dtype=torch.float) / 10
    return x


def test_accuracy_and_empty_sets():
    assert accuracy(torch.tensor([1, 2, 3, 4]), torch.tensor([1, 2, 0, 4]), 5) == 0.75
    assert math.isnan(
        accuracy(torch.tensor([], dtype=torch.long), torch.tensor([], dtype=torch.long), 5)
    )


def test_attack_metrics_by_hand():
    model = LookupModel()
    # clean: predictions 1,2,3,4 vs truth 1,2,0,4 -> CCA 3/4
    test = ImageSet(images([1, 2, 3, 4]), torch.tensor([1, 2, 0, 4]))
    # backdoor set: target 0; predictions 0,0,5,7,0 ; true labels 1,2,5,6,3
    backdoor = ImageSet(
        images([0, 0, 5, 7, 0]), torch.zeros(5), orig_y=torch.tensor([1, 2, 5, 6, 3])
    )
    metrics = attack_metrics(lambda x: predict(model, x, batch_size=2), test, backdoor)
    assert metrics["cca"] == 0.75
    assert metrics["asr"] == 3 / 5  # three predicted as the target
    assert metrics["ra"] == 1 / 5  # one (the 5) predicted as its true label


def test_predict_batches_and_accepts_uint8():
    model = LookupModel()
    x = (images([3, 1, 2]) * 255).round().to(torch.uint8)
    assert predict(model, x, batch_size=2).tolist() == [3, 1, 2]


def test_a_model_that_gives_one_label_to_nearly_every_input_is_degenerate():
    test = ImageSet(images([0, 1, 2, 3, 4, 5, 6, 7, 8, 9]), torch.arange(10))
    backdoor = ImageSet(images([0, 0]), torch.zeros(2), orig_y=torch.tensor([3, 4]))
    constant = prediction_metrics(torch.zeros(10, dtype=torch.long), torch.zeros(2), test, backdoor)
    assert constant["asr"] == 1.0 and constant["top_label_share"] == 1.0
    assert constant["degenerate"] is True
    nine = torch.tensor([0] * 9 + [1])  # 90 %: DEGENERATE_SHARE
    assert prediction_metrics(nine, torch.zeros(2), test, backdoor)["degenerate"] is True
    eight = torch.tensor([0] * 8 + [1, 2])
    working = prediction_metrics(eight, torch.zeros(2), test, backdoor)
    assert working["top_label_share"] == 0.8 and working["degenerate"] is False
