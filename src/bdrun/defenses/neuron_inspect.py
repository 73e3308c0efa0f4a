"""NeuronInspect: flag backdoor target labels from the saliency heatmaps of the output layer.

Huang, Alzantot and Srivastava, "NeuronInspect: Detecting Backdoors in Neural Networks via Output
Explanations" (arXiv:1911.07399, 2019). No code was released with the paper; the feature weights
follow TrojanZoo's reimplementation (ain-soph/trojanzoo,
trojanvision/defenses/backdoor/model_inspection/neuron_inspect.py).

For every output label t and clean holdout image x (images of class t left out: the question is
what pushes *other* inputs to t) the heatmap is the saliency map of the label's logit,
|d logit_t / dx| taken as the maximum over colour channels (Simonyan et al.'s saliency, the
explanation NeuronInspect and TrojanZoo use; `explanation=smoothgrad` averages it over noisy
copies of x instead, Smilkov et al. 2017, who suggest noise of 10-20 % of the input range and 50
samples; 0.1 and 16 here). A backdoor target's heatmaps point at the trigger on every image: they
are

- sparse: small L1 norm ||E||_1 (each heatmap is first scaled to a maximum of 1, `normalize`, so
  that the norm measures spread, not gradient size: the paper's features compare labels whose
  logits have different scales);
- smooth: small total variation sum |E[i+1, j] - E[i, j]| + |E[i, j+1] - E[i, j]| (the paper's
  smoothness; TrojanZoo uses the L1 norm of a Laplacian filter instead);
- persistent: the same pixels salient on every image. Measured as the mean, over the `top_k`
  share of pixels most often in the per-image top-k, of how often they are there (1 = the same
  top-k pixels on every image, about top_k for unrelated heatmaps); TrojanZoo approximates this
  with an XOR over thresholded maps.

The combined feature is the weighted sum lambda_sp * sparseness + lambda_sm * smoothness +
lambda_pe * (1 - persistence), each feature divided by its median over the labels first
(`scale_features`): TrojanZoo's weights 1e-5, 1e-5, 1 act on raw magnitudes and leave persistence
alone in charge; scaled features take weights 1, 1, 1. A label is flagged when the MAD anomaly
index of its combined feature on the small side exceeds `anomaly_threshold` (2, as Neural
Cleanse, whose outlier test the paper adopts); the model is flagged when any label is. The
defense inspects only (`inspect_model`): the model is left as it is.

On Fashion-MNIST BadNets the target passes the bar on one seed in three with saliency, and
SmoothGrad flags clean trousers beside it: docs/defenses/neuron_inspect.md
(scripts/experiments/neuron_inspect_seeds.py).
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

import torch
from torch import Tensor, nn

from bdrun.data.base import to_float
from bdrun.defenses.anomaly import flagged_labels, mad_anomaly_index
from bdrun.defenses.base import Defense, Verdict, require_holdout
from bdrun.errors import BdrunError
from bdrun.models.probes import input_gradients
from bdrun.report.triggers import plot_label_heatmaps
from bdrun.validate import coerce, fraction

if TYPE_CHECKING:
    from bdrun.context import RunContext
    from bdrun.data.base import ImageSet
    from bdrun.state import RunData


EXPLANATIONS = ("saliency", "smoothgrad")


def selected_logits(logits: Tensor, labels: Tensor) -> Tensor:
    return logits.gather(1, labels[:, None]).sum()


def saliency_maps(
    model: nn.Module,
    x: Tensor,
    labels: Tensor,
    batch_size: int = 1024,
    device: str | torch.device = "cpu",
    noise: float = 0.0,
    samples: int = 1,
    generator: torch.Generator | None = None,
) -> Tensor:
    """|d logit_labels[i] / d x[i]|, maximum over channels: [N, H, W] on the CPU. With `noise`
    > 0, SmoothGrad: the mean of `samples` such maps, each of x plus Gaussian noise of that
    standard deviation (images in [0, 1])."""
    if noise == 0:
        grads = input_gradients(model, x, labels, selected_logits, batch_size, device)
        return grads.abs().amax(1).float() if len(grads) else grads
    clean = to_float(x)
    total = torch.zeros(len(x), *x.shape[2:])
    for _ in range(samples):
        noisy = clean + noise * torch.randn(clean.shape, generator=generator)
        total += saliency_maps(model, noisy, labels, batch_size, device)
    return total / samples


def scale_to_max(heatmaps: Tensor) -> Tensor:
    """Each heatmap [N, H, W] divided by its maximum (all-zero maps stay zero)."""
    peak = heatmaps.flatten(1).amax(1).clamp_min(torch.finfo(heatmaps.dtype).tiny)
    return heatmaps / peak[:, None, None]


def sparseness(heatmaps: Tensor) -> Tensor:
    """L1 norm of each heatmap [N, H, W] -> [N]."""
    return heatmaps.abs().flatten(1).sum(1)


def smoothness(heatmaps: Tensor) -> Tensor:
    """Anisotropic total variation of each heatmap [N, H, W] -> [N]."""
    down = (heatmaps[:, 1:, :] - heatmaps[:, :-1, :]).abs().flatten(1).sum(1)
    right = (heatmaps[:, :, 1:] - heatmaps[:, :, :-1]).abs().flatten(1).sum(1)
    return down + right


def top_k_frequency(heatmaps: Tensor, top_k: float) -> Tensor:
    """How often each pixel is among an image's k = max(1, round(top_k * H * W)) most salient
    pixels, over the N heatmaps: [H * W] in [0, 1]."""
    flat = heatmaps.flatten(1)
    k = max(1, round(top_k * flat.shape[1]))
    hits = torch.zeros_like(flat)
    hits.scatter_(1, flat.topk(k, dim=1).indices, 1.0)
    return hits.mean(0)


def persistence(heatmaps: Tensor, top_k: float) -> float:
    """Mean frequency of the k pixels most often in the per-image top-k (see top_k_frequency):
    1.0 when every image has the same top-k pixels."""
    frequency = top_k_frequency(heatmaps, top_k)
    k = max(1, round(top_k * frequency.numel()))
    return float(frequency.topk(k).values.mean())


def combined_feature(
    sparse: Tensor,
    smooth: Tensor,
    persist: Tensor,
    weights: tuple[float, float, float],
    scale: bool,
) -> Tensor:
    """lambda_sp * sparseness + lambda_sm * smoothness + lambda_pe * (1 - persistence) per label;
    with `scale` each term is divided by its median over the labels (unit-free weights)."""
    terms = [sparse.double(), smooth.double(), (1 - persist).double()]
    if scale:
        terms = [t / torch.quantile(t, 0.5).clamp_min(1e-12) for t in terms]
    return sum(w * t for w, t in zip(weights, terms, strict=True))  # type: ignore[return-value]


class NeuronInspect(Defense):
    """Per-label saliency features (sparse, smooth, persistent), combined and MAD-tested.

    Parameters:
        max_samples: holdout images used for the heatmaps (chosen with the run's generator;
            null: all), of which each label uses those of the other classes.
        explanation: `saliency` (the paper's) or `smoothgrad` (noisy copies averaged).
        smoothgrad_noise, smoothgrad_samples: SmoothGrad's noise standard deviation (images in
            [0, 1]) and number of noisy copies.
        normalize: scale each heatmap to a maximum of 1 before the features.
        features_on: sparseness and smoothness of the label's mean heatmap (`mean`) or the mean
            of the per-image values (`images`).
        top_k: share of pixels counted as an image's most salient (persistence).
        lambda_sp, lambda_sm, lambda_pe: weights of sparseness, smoothness and (1 - persistence).
        scale_features: divide each feature by its median over labels before weighting.
        anomaly_threshold, consistency: the MAD outlier test (Neural Cleanse's).
        max_images: labels drawn in neuron_inspect_heatmaps.png.
    """

    def __init__(
        self,
        max_samples: int | None,
        explanation: str,
        smoothgrad_noise: float,
        smoothgrad_samples: int,
        normalize: bool,
        features_on: str,
        top_k: float,
        lambda_sp: float,
        lambda_sm: float,
        lambda_pe: float,
        scale_features: bool,
        anomaly_threshold: float,
        consistency: float,
        max_images: int,
    ) -> None:
        self.max_samples = (
            None if max_samples is None else coerce(max_samples, "int", "defense.max_samples")
        )
        if self.max_samples is not None and self.max_samples < 2:
            raise BdrunError(f"defense.max_samples={max_samples} must be >= 2 (or null for all)")
        if explanation not in EXPLANATIONS:
            raise BdrunError(f"defense.explanation={explanation!r} must be saliency or smoothgrad")
        self.explanation = explanation
        self.smoothgrad_noise = coerce(smoothgrad_noise, "float", "defense.smoothgrad_noise")
        if not self.smoothgrad_noise > 0:
            raise BdrunError(f"defense.smoothgrad_noise={smoothgrad_noise} must be > 0, e.g. 0.1")
        self.smoothgrad_samples = coerce(smoothgrad_samples, "int", "defense.smoothgrad_samples")
        if self.smoothgrad_samples < 1:
            raise BdrunError(f"defense.smoothgrad_samples={smoothgrad_samples} must be >= 1")
        self.normalize = bool(normalize)
        if features_on not in ("mean", "images"):
            raise BdrunError(f"defense.features_on={features_on!r} must be mean or images")
        self.features_on = features_on
        self.top_k = fraction(top_k, "defense.top_k")
        if self.top_k == 0:
            raise BdrunError("defense.top_k=0 must be a share of pixels in (0, 1], e.g. 0.05")
        weights = []
        named = (("lambda_sp", lambda_sp), ("lambda_sm", lambda_sm), ("lambda_pe", lambda_pe))
        for name, value in named:
            weight = coerce(value, "float", f"defense.{name}")
            if weight < 0:
                raise BdrunError(f"defense.{name}={value} must be >= 0")
            weights.append(weight)
        if sum(weights) == 0:
            raise BdrunError("defense.lambda_sp, lambda_sm and lambda_pe are all 0; set one > 0")
        self.weights: tuple[float, float, float] = (weights[0], weights[1], weights[2])
        self.scale_features = bool(scale_features)
        self.anomaly_threshold = coerce(anomaly_threshold, "float", "defense.anomaly_threshold")
        self.consistency = coerce(consistency, "float", "defense.consistency")
        if self.consistency <= 0:
            raise BdrunError(f"defense.consistency={consistency} must be > 0, e.g. 1.4826")
        self.max_images = coerce(max_images, "int", "defense.max_images")

    def analyse(self, model: nn.Module, holdout: ImageSet, ctx: RunContext) -> Verdict:
        started = time.perf_counter()
        require_holdout(holdout, 2, "NeuronInspect")
        sample = holdout.random_subset(self.max_samples, ctx.generator("neuron-inspect-samples"))
        x, y = sample.x, sample.y
        classes = ctx.info.num_classes
        sparse, smooth, persist = (torch.zeros(classes, dtype=torch.float64) for _ in range(3))
        mean_maps = torch.zeros(classes, *x.shape[2:])
        batch = ctx.settings.eval_batch_size
        noise = self.smoothgrad_noise if self.explanation == "smoothgrad" else 0.0  # 0: plain
        for label in range(classes):
            others = y != label
            if not bool(others.any()):  # a holdout of one class: use it all
                others = torch.ones_like(others)
            targets = torch.full((int(others.sum()),), label)
            noisy = ctx.generator(f"neuron-inspect-noise-{label}")
            maps = saliency_maps(
                model, x[others], targets, batch, ctx.device, noise, self.smoothgrad_samples, noisy
            )
            if self.normalize:
                maps = scale_to_max(maps)
            mean_maps[label] = maps.mean(0)
            # per image, or on the label's mean heatmap scaled to a maximum of 1 (noise that
            # moves from image to image averages out, a trigger's pixels stay)
            shaped = scale_to_max(mean_maps[label][None]) if self.features_on == "mean" else maps
            sparse[label] = float(sparseness(shaped).double().mean())
            smooth[label] = float(smoothness(shaped).double().mean())
            persist[label] = persistence(maps, self.top_k)
        combined = combined_feature(sparse, smooth, persist, self.weights, self.scale_features)
        index, median, mad = mad_anomaly_index(combined, self.consistency)
        labels = torch.arange(classes)
        flagged = flagged_labels(index, labels, self.anomaly_threshold)
        per_feature = {
            name: mad_anomaly_index(values, self.consistency)[0].tolist()
            for name, values in (
                ("sparseness", sparse),
                ("smoothness", smooth),
                ("inconsistency", 1 - persist),
            )
        }
        ctx.record(
            sparseness=sparse.tolist(),
            smoothness=smooth.tolist(),
            persistence=persist.tolist(),
            combined_feature=combined.tolist(),
            combined_median=median,
            combined_mad=mad,
            feature_anomaly_index=per_feature,
            heatmap_images=len(x),
            explanation=self.explanation,
            inspect_s=time.perf_counter() - started,
        )
        plot = plot_label_heatmaps(
            mean_maps,
            labels.tolist(),
            index.tolist(),
            flagged,
            ctx.run_dir / "neuron_inspect_heatmaps.png",
            self.max_images,
        )
        ctx.logger.log_image("neuron_inspect_heatmaps", plot)
        # the model-level score: the most anomalous label's index
        return Verdict(flagged, index.tolist(), float(index.max()))

    def inspect_model(self, model: nn.Module, data: RunData, ctx: RunContext) -> Verdict:
        """Inspect the model on the clean holdout (the model itself is left as it is)."""
        return self.analyse(model, data.holdout, ctx)
