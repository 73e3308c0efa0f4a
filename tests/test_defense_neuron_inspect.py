"""NeuronInspect: heatmap features by hand, saliency of known models, digits and FMNIST runs."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from bdrun.config import component
from bdrun.defenses.anomaly import flagged_labels, mad_anomaly_index
from bdrun.defenses.neuron_inspect import (
    combined_feature,
    persistence,
    saliency_maps,
    scale_to_max,
    smoothness,
    sparseness,
    top_k_frequency,
)
from bdrun.errors import BdrunError
from bdrun.runner import run

from conftest import compose_config, needs_fashion_mnist, run_fashion_mnist


def test_sparseness_and_smoothness_match_a_hand_computation():
    maps = torch.tensor([[[2.0, 0.0], [0.0, 1.0]], [[0.0, 0.0], [0.0, 0.0]]])
    scaled = scale_to_max(maps)
    assert scaled[0].tolist() == [[1.0, 0.0], [0.0, 0.5]]
    assert scaled[1].abs().sum() == 0  # an all-zero map stays zero, no NaN
    assert sparseness(scaled).tolist() == [1.5, 0.0]
    # down: |0 - 1| + |0.5 - 0| = 1.5, right: |0 - 1| + |0.5 - 0| = 1.5
    assert smoothness(scaled).tolist() == [3.0, 0.0]
    # a 3x3 map with one bright centre pixel: four edges of height 1 each way
    spot = torch.zeros(1, 3, 3)
    spot[0, 1, 1] = 1.0
    assert smoothness(spot).item() == 4.0


def test_persistence_counts_how_often_pixels_are_in_the_top_k():
    maps = torch.tensor(
        [
            [[4.0, 3.0], [2.0, 1.0]],  # top-2: pixels 0, 1
            [[4.0, 1.0], [3.0, 2.0]],  # top-2: pixels 0, 2
            [[1.0, 2.0], [3.0, 4.0]],  # top-2: pixels 3, 2
        ]
    )
    assert top_k_frequency(maps, 0.5).tolist() == pytest.approx([2 / 3, 1 / 3, 2 / 3, 1 / 3])
    # the two most frequent pixels are there 2/3 of the time
    assert persistence(maps, 0.5) == pytest.approx(2 / 3)
    # top-1: pixel 0, 0, 3 -> frequencies 2/3, 0, 0, 1/3
    assert persistence(maps, 0.25) == pytest.approx(2 / 3)
    same = maps[:1].repeat(5, 1, 1)
    assert persistence(same, 0.5) == 1.0


def test_combined_feature_scales_each_feature_by_its_median():
    sparse = torch.tensor([1.0, 2.0, 4.0])
    smooth = torch.tensor([10.0, 10.0, 30.0])
    persist = torch.tensor([0.5, 0.75, 0.75])  # inconsistency 0.5, 0.25, 0.25 (median 0.25)
    combined = combined_feature(sparse, smooth, persist, (1.0, 1.0, 1.0), scale=True)
    assert combined.tolist() == pytest.approx([0.5 + 1 + 2, 1 + 1 + 1, 2 + 3 + 1])
    raw = combined_feature(sparse, smooth, persist, (1.0, 0.0, 2.0), scale=False)
    assert raw.tolist() == pytest.approx([2.0, 2.5, 4.5])


def test_saliency_of_a_linear_model_is_its_weight_row():
    model = nn.Sequential(nn.Flatten(), nn.Linear(2 * 3 * 3, 4))
    x = torch.rand(5, 2, 3, 3)
    maps = saliency_maps(model, x, torch.full((5,), 2), batch_size=2)
    expected = model[1].weight[2].detach().view(2, 3, 3).abs().amax(0)
    assert maps.shape == (5, 3, 3)
    assert torch.allclose(maps, expected.expand(5, 3, 3))


def test_smoothgrad_of_a_linear_model_is_its_weight_row_and_noise_moves_a_relu_one():
    linear = nn.Sequential(nn.Flatten(), nn.Linear(2 * 3 * 3, 4))
    x = torch.rand(5, 2, 3, 3)
    labels = torch.full((5,), 2)
    g = torch.Generator().manual_seed(0)
    smooth = saliency_maps(linear, x, labels, 2, "cpu", noise=0.3, samples=4, generator=g)
    assert torch.allclose(smooth, saliency_maps(linear, x, labels))  # constant gradient
    # a ReLU between two layers: the noisy copies cross its kinks, so the mean map moves
    torch.manual_seed(0)
    relu = nn.Sequential(nn.Flatten(), nn.Linear(18, 8), nn.ReLU(), nn.Linear(8, 4))
    plain = saliency_maps(relu, x, labels)
    g = torch.Generator().manual_seed(0)
    smooth = saliency_maps(relu, x, labels, 2, "cpu", noise=0.5, samples=8, generator=g)
    assert smooth.shape == plain.shape and not torch.allclose(smooth, plain)
    # uint8 images are scaled to [0, 1] before the noise, as the plain map scales them
    as_bytes = (x * 255).round().to(torch.uint8)
    g = torch.Generator().manual_seed(0)
    tiny = saliency_maps(relu, as_bytes, labels, 2, "cpu", noise=1e-9, samples=2, generator=g)
    assert torch.allclose(tiny, saliency_maps(relu, as_bytes, labels), atol=1e-6)


class CornerBackdoor(nn.Module):
    """A smooth-ish linear classifier on 8x8 images plus a hand-made backdoor: a 2x2 corner
    patch pushes class `target` up strongly (its saliency sits on those 4 pixels)."""

    def __init__(self, target: int = 3, classes: int = 6) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.weight = nn.Parameter(torch.rand(classes, 64, generator=g) + 0.5)
        self.target = target

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits = x.flatten(1) @ self.weight.T
        bump = torch.zeros_like(logits)
        bump[:, self.target] = 40 * x[:, 0, 6:8, 6:8].mean((1, 2))
        return logits + bump


def test_a_planted_corner_backdoor_is_the_sparse_outlier():
    model = CornerBackdoor(target=3)
    x = torch.rand(40, 1, 8, 8)
    sparse = torch.zeros(6)
    for label in range(6):
        maps = scale_to_max(saliency_maps(model, x, torch.full((40,), label)))
        sparse[label] = sparseness(scale_to_max(maps.mean(0)[None]))[0]
    assert int(sparse.argmin()) == 3
    index, _, _ = mad_anomaly_index(sparse)
    assert flagged_labels(index, torch.arange(6)) == [3]


@pytest.mark.parametrize(
    "settings, message",
    [
        ({"top_k": 0}, "defense.top_k=0"),
        ({"top_k": 1.5}, "defense.top_k=1.5"),
        ({"lambda_sm": -1}, "defense.lambda_sm=-1"),
        ({"lambda_sp": 0, "lambda_sm": 0, "lambda_pe": 0}, "all 0"),
        ({"features_on": "pixels"}, "defense.features_on='pixels'"),
        ({"max_samples": 1}, "defense.max_samples=1"),
        ({"consistency": 0}, "defense.consistency=0"),
        ({"explanation": "gradcam"}, "defense.explanation='gradcam'"),
        ({"smoothgrad_noise": 0}, "defense.smoothgrad_noise=0"),
        ({"smoothgrad_samples": 0}, "defense.smoothgrad_samples=0"),
    ],
)
def test_bad_settings_are_user_errors(settings, message):
    with pytest.raises(BdrunError, match=message):
        component("defense", "neuron_inspect", **settings)


@pytest.mark.parametrize("explanation", ["saliency", "smoothgrad"])
def test_digits_run_reports_a_score_per_label_and_leaves_the_model_alone(explanation, tmp_path):
    overrides = ("defense=neuron_inspect", "logger=none", f"defense.explanation={explanation}")
    results = run(compose_config(*overrides), tmp_path)
    detection = results["metrics"]["detection"]
    assert detection["explanation"] == explanation
    for key in ("anomaly_index", "sparseness", "smoothness", "persistence", "combined_feature"):
        assert len(detection[key]) == 10
    assert isinstance(detection["model_flagged"], bool)
    assert detection["max_anomaly_index"] == max(detection["anomaly_index"])
    assert detection["model_flagged"] == bool(detection["flagged_labels"])
    assert all(detection["anomaly_index"][label] > 2 for label in detection["flagged_labels"])
    assert results["metrics"]["before"] == results["metrics"]["after"]  # inspects only
    assert (tmp_path / "neuron_inspect_heatmaps.png").stat().st_size > 0
    json.dumps(detection)  # plain JSON, no tensors
    # measured: the 3x3 trigger on 8x8 digits is not an outlier (label 0 index 0.74)
    # (docs/defenses/neuron_inspect.md)
    print(detection["anomaly_index"])


# the seed study behind this xfail: docs/defenses/neuron_inspect.md
@pytest.mark.xfail(
    strict=True,
    reason="measured 2026-12-02 on the cached FMNIST BadNets 10 % model: target 0's mean heatmap "
    "shows the trigger but it is not sparser or smoother than the others' (sparseness index 1.6, "
    "smoothness 0.7): combined index 1.40 < 2. Over seeds 0 / 1 / 2 "
    "(scripts/experiments/neuron_inspect_seeds.py) the target's index is 1.40 / 2.65 / 0.60 "
    "and the clean models' largest 1.68 / 1.37 / 1.51: one seed in three meets both bars. "
    "explanation=smoothgrad flags the target on all three (5.87 / 2.10 / 2.31) but trousers "
    "too, on the clean models of seeds 0 and 1 (2.62 / 2.21): trouser heatmaps are as sparse "
    "and persistent as a trigger's. No setting tried separates the two (top_k 0.01-0.1, "
    "features per image, no scaling, TrojanZoo's raw weights, persistence alone, 2000 images)",
)
@pytest.mark.slow
@needs_fashion_mnist
def test_neuron_inspect_flags_the_fmnist_badnets_target(tmp_path):
    results = run_fashion_mnist(tmp_path, "attack=badnets", "defense=neuron_inspect")
    detection = results["metrics"]["detection"]
    print(detection["anomaly_index"], detection["feature_anomaly_index"])
    assert detection["model_flagged"] and 0 in detection["flagged_labels"]


@pytest.mark.slow
@needs_fashion_mnist
def test_smoothgrad_flags_the_fmnist_badnets_target(tmp_path):
    # measured 2026-12-02 (seed 0): target index 5.87, trousers 2.53 flagged with it; on the
    # clean model trousers reach 2.62, which is why smoothgrad is not the default
    # (docs/defenses/neuron_inspect.md)
    explanation = "defense.explanation=smoothgrad"
    results = run_fashion_mnist(tmp_path, "attack=badnets", "defense=neuron_inspect", explanation)
    index = results["metrics"]["detection"]["anomaly_index"]
    print(index)
    assert index[0] > 2 and index[0] == max(index)


@pytest.mark.slow
@needs_fashion_mnist
def test_neuron_inspect_flags_nothing_on_a_clean_fmnist_model(tmp_path):
    results = run_fashion_mnist(tmp_path, "attack=none", "defense=neuron_inspect")
    detection = results["metrics"]["detection"]
    print(detection["anomaly_index"])
    assert not detection["model_flagged"] and detection["flagged_labels"] == []
