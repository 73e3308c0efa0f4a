"""GoodNet's decision rule (B' label on agreement, class N on disagreement), alone and in a run."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from torch import nn

from bdrun.config import component
from bdrun.defenses.goodnet import Disagreement, goodnet_labels
from bdrun.errors import BdrunError
from bdrun.runner import run

from conftest import compose_config


def test_goodnet_outputs_the_repaired_label_on_agreement_and_class_n_otherwise():
    reference = torch.tensor([1, 2, 3, 0, 4])
    repaired = torch.tensor([1, 0, 3, 0, 2])
    assert goodnet_labels(reference, repaired, num_classes=5).tolist() == [1, 5, 3, 0, 5]


class FixedLabel(nn.Module):
    """Labels an image by thresholding its mean: label `low` below 0.5, `high` above."""

    def __init__(self, low: int, high: int) -> None:
        super().__init__()
        self.low, self.high = low, high
        self.anchor = nn.Parameter(torch.zeros(1))  # a parameter, so it has a device

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bright = x.flatten(1).mean(1) > 0.5
        labels = torch.where(bright, self.high, self.low)
        return nn.functional.one_hot(labels, 4).float() + 0 * self.anchor


def test_disagreement_detector_rejects_exactly_where_the_networks_differ():
    ctx = SimpleNamespace(settings=SimpleNamespace(eval_batch_size=2), device=torch.device("cpu"))
    detector = Disagreement(FixedLabel(1, 2), FixedLabel(1, 3), ctx)
    x = torch.stack([torch.full((1, 4, 4), v) for v in (0.1, 0.9, 0.2, 0.8, 0.7)])
    assert detector.rejects(x).tolist() == [False, True, False, True, True]


def test_goodnet_run_counts_flagged_inputs_as_class_n(tmp_path):
    cfg = compose_config("defense=goodnet", "logger=none", "defense.epochs=2")
    results = run(cfg, tmp_path)
    after, detection = results["metrics"]["after"], results["metrics"]["detection"]
    # a flagged clean input is never correct, a flagged backdoor input never reaches the target
    assert after["cca"] <= detection["repaired_cca"] + 1e-9
    assert after["cca"] <= 1 - detection["flagged_clean"] + 1e-9
    assert after["asr"] <= min(detection["repaired_asr"], 1 - detection["flagged_backdoor"]) + 1e-9
    assert detection["frr"] == detection["flagged_clean"]
    assert (tmp_path / "pruning_curve_goodnet.csv").is_file()


def test_goodnet_b0_variant_runs_and_rejects_unknown_references(tmp_path):
    cfg = compose_config(
        "defense=goodnet", "defense.reference=b0", "logger=none", "debug=smoke", "defense.epochs=1"
    )
    results = run(cfg, tmp_path)
    assert results["metrics"]["detection"]["reference"] == "b0"
    with pytest.raises(BdrunError, match="defense.reference='b1'"):
        component("defense", "goodnet", reference="b1")
