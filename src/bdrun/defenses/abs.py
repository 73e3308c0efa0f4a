"""ABS: find neurons that alone lift one label (stimulation), reverse their triggers, flag by REASR.

Liu, Lee, Tao, Ma, Aafer and Zhang, "ABS: Scanning Neural Networks for Back-doors by Artificial
Brain Stimulation" (ACM CCS 2019); defaults from the authors' code (naiyeleo/ABS: config.json of
the released CIFAR-10 scanner, and TrojAI_competition/round1/abs_pytorch_round1.py for the
algorithm) and TrojanZoo's reimplementation (trojanvision/defenses/backdoor/model_inspection/
abs.py) where the authors' CIFAR settings are only in their binary.

1. Seed images: `images_per_class` clean holdout images per class (5, TrojanZoo's seed_data_num
   = -5; the authors ship 10 or 50 CIFAR seeds).
2. Stimulation (sample_neuron): on `layer` (default the model's `rank_layer`, the activation of
   its last conv layer: the authors stimulate activation layers of the last conv stages), one
   neuron (a whole channel) at a time is set to each of `n_samples` values evenly spaced from 0
   to `samp_k` x the layer's largest activation on the seeds (config.json: samp_k 4, n_samples
   5), and the logits are recorded.
3. Candidates (find_min_max): per neuron and image, label l's elevation is its largest logit over
   the raised values minus its logit at 0; the image votes for the most elevated label, with the
   margin to the second. A neuron whose modal label wins on at least `min_share` (0.9) of the
   seeds is a candidate, valued by its smallest margin on seeds of other classes; the
   `top_n_neurons` (10) best, at most `per_label` (1) per label, go on.
4. Reverse engineering (reverse_engineer / loss_fn): a mask (tanh-bounded, starting as a small
   square in the middle) and a pattern are optimised with Adam (`lr` 0.1, `steps` 1000) on the
   seeds to maximise the candidate's activation (its value before the activation function plus
   after it: when `layer` is an activation module, its input and output) while keeping the
   layer's other neurons low (weight 1e-4), with a mask-size penalty: 0.01 x sum(mask) while at
   most `max_trigger_size` of the pixels exceed `mask_epsilon` (config.json: 64 of 32 x 32 =
   6.25 %), `mask_weight` (500, TrojanZoo) x sum(mask) above it, twice that above 1.2 x. The
   round-1 code also pushes the candidate label's logit (`logit_weight`, 0 = the paper's
   neuron-only loss). Each candidate stops once `early_stop` (0.99) of the seeds of other classes
   take its label (round 1: 0.99).
5. REASR: the share of clean holdout images (`max_samples`, other classes only) the reversed
   trigger sends to the candidate's label. The model is flagged when a candidate reaches
   `reasr_bound` (config.json: 0.8); flagged labels are those candidates' labels.

Report: `reasr` and `anomaly_index` (the same list) hold each label's best REASR (0 where the
label had no candidate) -- ABS's score is a REASR, not a MAD index; `max_anomaly_index` is the
highest REASR. Candidates are optimised together (K x seeds per forward pass), as Neural
Cleanse's labels are. The defense inspects only (`inspect_model`): the model is left as it is.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from bdrun.data.base import to_float
from bdrun.defenses.base import Defense, Verdict, require_holdout
from bdrun.errors import BdrunError
from bdrun.finite import DivergenceWatch
from bdrun.metrics import on_device, predict
from bdrun.models.probes import frozen_weights, get_module, layer_outputs
from bdrun.report.triggers import plot_reversed_triggers, save_triggers
from bdrun.validate import coerce, fraction

if TYPE_CHECKING:
    from bdrun.context import RunContext
    from bdrun.data.base import ImageSet
    from bdrun.state import RunData

OTHER_NEURONS_WEIGHT = 1e-4  # the authors' weight on the layer's other neurons (loss_fn)
ACTIVATIONS = (nn.ReLU, nn.LeakyReLU, nn.ELU, nn.GELU, nn.SiLU, nn.ReLU6)


@dataclass
class Candidate:
    """A neuron whose stimulation lifts `label` on the seed images; `elevation` is its smallest
    label-elevation margin over seeds of other classes, `share` the seeds voting for `label`."""

    neuron: int
    label: int
    elevation: float
    share: float


def seed_images(data: ImageSet, per_class: int, num_classes: int, g: torch.Generator) -> ImageSet:
    """Up to `per_class` random images of each class (in class order)."""
    order = torch.randperm(len(data), generator=g)
    labels = data.y[order]
    picks = [order[labels == c][:per_class] for c in range(num_classes)]
    return data.subset(torch.cat(picks))


@torch.no_grad()
def stimulate(
    model: nn.Module,
    layer: str,
    x: Tensor,
    values: Tensor,
    rows_per_pass: int = 4096,
    device: str | torch.device = "cpu",
) -> Tensor:
    """Logits [neurons, values, images, classes]: `model` on images x with one neuron (channel) of
    `layer` set to each of `values` everywhere, for every neuron of the layer."""
    x = to_float(x)
    channels = layer_outputs(model, layer, x[:2], device=device).shape[1]
    state: dict[str, Tensor] = {}

    def overwrite(_module: nn.Module, _inputs: object, out: Tensor) -> Tensor:
        neurons = state["neurons"]
        k, s, b = len(neurons), len(values), len(x)
        shaped = out.reshape(k, s, b, out.shape[1], -1).clone()
        shaped[torch.arange(k, device=out.device), :, :, neurons] = values.to(out).view(1, s, 1, 1)
        return shaped.view_as(out)

    per_pass = max(1, rows_per_pass // (len(values) * len(x)))
    results = []
    handle = get_module(model, layer).register_forward_hook(overwrite)
    try:
        with on_device(model.eval(), device):
            batch = x.to(device)
            for start in range(0, channels, per_pass):
                neurons = torch.arange(start, min(start + per_pass, channels), device=device)
                state["neurons"] = neurons
                repeated = batch.repeat(len(neurons) * len(values), 1, 1, 1)
                logits = model(repeated).float().cpu()
                results.append(logits.view(len(neurons), len(values), len(x), -1))
    finally:
        handle.remove()
    return torch.cat(results)


def label_elevation(logits: Tensor) -> tuple[Tensor, Tensor]:
    """From stimulation logits [neurons, values, images, classes] (values[0] = 0): per neuron and
    image, the most elevated label (largest logit over the raised values minus the logit at 0)
    and its margin over the second most elevated: ([neurons, images], [neurons, images])."""
    elevation = logits[:, 1:].amax(1) - logits[:, 0]
    top = elevation.topk(2, dim=-1)
    return top.indices[..., 0], top.values[..., 0] - top.values[..., 1]


def select_candidates(
    top_label: Tensor,
    margin: Tensor,
    image_labels: Tensor,
    top_n: int = 10,
    min_share: float = 0.9,
    per_label: int = 1,
) -> list[Candidate]:
    """The authors' find_min_max: neurons whose modal top label wins on at least
    floor(min_share * images) seeds, valued by their smallest margin on seeds of other classes
    that vote for that label (0 if none), best first, at most `per_label` per label."""
    images = top_label.shape[1]
    mode = top_label.mode(dim=1).values
    votes = top_label == mode[:, None]
    counted = votes & (image_labels[None, :] != mode[:, None])
    value = torch.where(counted, margin, torch.full_like(margin, math.inf)).amin(1)
    value = torch.where(counted.any(1), value, torch.zeros_like(value))
    eligible = votes.sum(1) >= int(images * min_share)
    chosen: list[Candidate] = []
    taken: dict[int, int] = {}
    for neuron in torch.argsort(value, descending=True, stable=True).tolist():
        label = int(mode[neuron])
        if not bool(eligible[neuron]) or taken.get(label, 0) >= per_label:
            continue
        taken[label] = taken.get(label, 0) + 1
        share = float(votes[neuron].float().mean())
        chosen.append(Candidate(neuron, label, float(value[neuron]), share))
        if len(chosen) >= top_n:
            break
    return chosen


def mask_penalty(mask: Tensor, max_pixels: int, weight: float, epsilon: float) -> Tensor:
    """The authors' mask loss per trigger [K, 1, H, W] -> [K]: 0.01 x sum(mask) while at most
    `max_pixels` exceed epsilon, weight x sum above that, 2 x weight x sum above 1.2 x."""
    total = mask.flatten(1).sum(1)
    nonzero = (mask > epsilon).flatten(1).sum(1)
    scale = torch.where(
        nonzero > 1.2 * max_pixels,
        2 * weight,
        torch.where(nonzero > max_pixels, weight, 0.01),
    )
    return scale * total


def initial_mask(height: int, width: int, max_pixels: int) -> Tensor:
    """The authors' filter_img in tanh space: a square of side int(0.8 sqrt(max_pixels)) from
    the image centre towards the bottom right near 1, everything else near 0 -> [1, 1, H, W]."""
    side = max(1, int(math.sqrt(max_pixels) * 0.8))
    square = torch.zeros(height, width)
    square[height // 2 : height // 2 + side, width // 2 : width // 2 + side] = 1
    return (square * 6 - 4).view(1, 1, height, width)


@dataclass
class ReverseSettings:
    steps: int = 1000
    lr: float = 0.1
    max_pixels: int = 64
    mask_weight: float = 500.0
    mask_epsilon: float = 0.01
    logit_weight: float = 0.0
    early_stop: float = 0.99


def reverse_neuron_triggers(
    model: nn.Module,
    layer: str,
    x: Tensor,
    y: Tensor,
    candidates: list[Candidate],
    s: ReverseSettings,
    g: torch.Generator,
    device: str | torch.device = "cpu",
) -> tuple[Tensor, Tensor, Tensor]:
    """(masks [K, 1, H, W], patterns [K, C, H, W], steps run [K]) for the K candidates, optimised
    together on seed images x (labels y). Weights are not touched."""
    k = len(candidates)
    x = to_float(x)
    channels, height, width = x.shape[1:]
    neurons = torch.tensor([c.neuron for c in candidates])
    labels = torch.tensor([c.label for c in candidates])
    mask_param = initial_mask(height, width, s.max_pixels).repeat(k, 1, 1, 1)
    pattern_param = torch.rand(k, channels, height, width, generator=g) * 2 - 1
    best_mask = torch.tanh(mask_param) / 2 + 0.5
    best_pattern = torch.tanh(pattern_param) / 2 + 0.5
    steps = torch.full((k,), s.steps, dtype=torch.long)
    active = torch.ones(k, dtype=torch.bool)
    captured: list[Tensor] = []

    module = get_module(model, layer)
    activation = isinstance(module, ACTIVATIONS)

    def capture(_module: nn.Module, inputs: tuple[Tensor, ...], out: Tensor) -> None:
        # the authors' inner_outputs_b: before the activation (a dead ReLU passes no gradient)
        captured.append(inputs[0] if activation else out)

    handle = module.register_forward_hook(capture)
    try:  # only the trigger is optimised
        with frozen_weights(model), on_device(model.eval(), device):
            batch = x.to(device)
            others = (y.to(device)[None, :] != labels.to(device)[:, None]).float()  # [K, B]
            mask_param = mask_param.to(device).requires_grad_(True)
            pattern_param = pattern_param.to(device).requires_grad_(True)
            optimizer = torch.optim.Adam([mask_param, pattern_param], lr=s.lr)
            pick = torch.arange(k, device=device)
            neurons_dev, labels_dev = neurons.to(device), labels.to(device)
            watch = DivergenceWatch(
                "ABS's trigger reverse-engineering", s.lr, s.steps, "step", "defense.lr"
            )
            for step in range(s.steps):
                mask = torch.tanh(mask_param) / 2 + 0.5
                pattern = torch.tanh(pattern_param) / 2 + 0.5
                stamped = (1 - mask[:, None]) * batch[None] + (mask * pattern)[:, None]
                captured.clear()
                logits = model(stamped.flatten(0, 1)).view(k, len(batch), -1)
                feats = captured[0].reshape(k, len(batch), captured[0].shape[1], -1)
                feats = feats + F.relu(feats)  # inner_outputs_b + inner_outputs_a (loss_fn)
                chosen = feats[pick, :, neurons_dev].sum((1, 2))  # [K]
                rest = (feats.sum((1, 2, 3)) - chosen) / max(feats.shape[2] - 1, 1)
                label_logit = logits[pick, :, labels_dev].sum(1)
                penalty = mask_penalty(mask, s.max_pixels, s.mask_weight, s.mask_epsilon)
                loss = -chosen + OTHER_NEURONS_WEIGHT * rest + penalty
                loss = loss - s.logit_weight * label_logit
                optimizer.zero_grad(set_to_none=True)
                total = (loss * active.to(device)).sum()
                total.backward()
                optimizer.step()
                watch.observe(total)
                watch.check(step + 1, [mask_param, pattern_param])  # it reads success back anyway
                with torch.no_grad():
                    hits = (logits.argmax(-1) == labels_dev[:, None]).float()
                    success = ((hits * others).sum(1) / others.sum(1).clamp_min(1)).cpu()
                    done = active & (success >= s.early_stop)
                    if done.any():  # the trigger of this very step reached the mark
                        best_mask[done] = mask.detach().cpu()[done]
                        best_pattern[done] = pattern.detach().cpu()[done]
                        steps[done] = step + 1
                        active &= ~done
                if not active.any():
                    break
            with torch.no_grad():
                best_mask[active] = (torch.tanh(mask_param) / 2 + 0.5).detach().cpu()[active]
                best_pattern[active] = (torch.tanh(pattern_param) / 2 + 0.5).detach().cpu()[active]
    finally:
        handle.remove()
    return best_mask, best_pattern, steps


def reasr(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    masks: Tensor,
    patterns: Tensor,
    labels: Tensor,
    batch_size: int = 1024,
    device: str | torch.device = "cpu",
) -> Tensor:
    """Per trigger k: the share of images x not of class labels[k] that the model assigns to
    labels[k] once the trigger is stamped ([K] floats; NaN when no image qualifies)."""
    x = to_float(x)
    rates = []
    for mask, pattern, label in zip(masks, patterns, labels.tolist(), strict=True):
        keep = y != label
        if not bool(keep.any()):
            rates.append(math.nan)
            continue
        stamped = (1 - mask) * x[keep] + mask * pattern
        rates.append(float((predict(model, stamped, batch_size, device) == label).float().mean()))
    return torch.tensor(rates, dtype=torch.float64)


class ABS(Defense):
    """Artificial Brain Stimulation; see the module docstring for the steps and defaults.

    Parameters:
        layer: module whose output neurons (channels) are stimulated; null: the model's
            rank_layer (activation of its last conv layer).
        images_per_class: seed images per class from the clean holdout.
        samp_k, n_samples: stimulation values 0 .. samp_k x the layer's max activation.
        min_share, top_n_neurons, per_label: candidate selection.
        steps, lr, max_trigger_size (share of pixels), mask_weight, mask_epsilon, logit_weight,
        early_stop: trigger reverse engineering.
        reasr_bound: flag a candidate (and the model) at this REASR.
        max_samples: holdout images for REASR (null: all).
        max_images: candidates drawn in abs_triggers.png.
    """

    def __init__(
        self,
        layer: str | None,
        images_per_class: int,
        samp_k: float,
        n_samples: int,
        min_share: float,
        top_n_neurons: int,
        per_label: int,
        steps: int,
        lr: float,
        max_trigger_size: float,
        mask_weight: float,
        mask_epsilon: float,
        logit_weight: float,
        early_stop: float,
        reasr_bound: float,
        max_samples: int | None,
        max_images: int,
    ) -> None:
        self.layer = layer
        self.images_per_class = self._positive(images_per_class, "images_per_class")
        self.samp_k = coerce(samp_k, "float", "defense.samp_k")
        if self.samp_k <= 0:
            raise BdrunError(f"defense.samp_k={samp_k} must be > 0, e.g. 4")
        self.n_samples = coerce(n_samples, "int", "defense.n_samples")
        if self.n_samples < 2:
            raise BdrunError(f"defense.n_samples={n_samples} must be >= 2 (0 and a raised value)")
        self.min_share = fraction(min_share, "defense.min_share")
        self.top_n_neurons = self._positive(top_n_neurons, "top_n_neurons")
        self.per_label = self._positive(per_label, "per_label")
        self.steps = self._positive(steps, "steps")
        self.lr = coerce(lr, "float", "defense.lr")
        if self.lr <= 0:
            raise BdrunError(f"defense.lr={lr} must be > 0, e.g. 0.1")
        self.max_trigger_size = fraction(max_trigger_size, "defense.max_trigger_size")
        if self.max_trigger_size == 0:
            raise BdrunError("defense.max_trigger_size=0 must be a share of pixels, e.g. 0.0625")
        self.mask_weight = coerce(mask_weight, "float", "defense.mask_weight")
        if self.mask_weight < 0:
            raise BdrunError(f"defense.mask_weight={mask_weight} must be >= 0, e.g. 500")
        self.mask_epsilon = fraction(mask_epsilon, "defense.mask_epsilon")
        self.logit_weight = coerce(logit_weight, "float", "defense.logit_weight")
        self.early_stop = fraction(early_stop, "defense.early_stop")
        self.reasr_bound = fraction(reasr_bound, "defense.reasr_bound")
        self.max_samples = (
            None if max_samples is None else self._positive(max_samples, "max_samples")
        )
        self.max_images = coerce(max_images, "int", "defense.max_images")

    @staticmethod
    def _positive(value: Any, name: str) -> int:
        number = coerce(value, "int", f"defense.{name}")
        if number < 1:
            raise BdrunError(f"defense.{name}={value} must be an integer >= 1")
        return number

    def resolve_layer(self, model: nn.Module) -> str:
        layer = self.layer or getattr(model, "rank_layer", "")
        if not layer:
            raise BdrunError(f"model {type(model).__name__} names no rank_layer; set defense.layer")
        get_module(model, layer)  # a BdrunError listing layers when it does not exist
        return layer

    def analyse(self, model: nn.Module, holdout: ImageSet, ctx: RunContext) -> Verdict:
        started = time.perf_counter()
        layer = self.resolve_layer(model)
        require_holdout(holdout, 1, "ABS")
        classes, device = ctx.info.num_classes, ctx.device
        seeds = seed_images(holdout, self.images_per_class, classes, ctx.generator("abs-seeds"))
        seed_x = to_float(seeds.x)
        layer_max = float(layer_outputs(model, layer, seed_x, device=device).max())
        values = torch.linspace(0, self.samp_k * max(layer_max, 0.0), self.n_samples)
        logits = stimulate(model, layer, seed_x, values, device=device)
        top_label, margin = label_elevation(logits)
        candidates = select_candidates(
            top_label, margin, seeds.y, self.top_n_neurons, self.min_share, self.per_label
        )
        stimulated = time.perf_counter()
        height, width = seed_x.shape[2:]
        settings = ReverseSettings(
            steps=self.steps,
            lr=self.lr,
            max_pixels=max(1, round(self.max_trigger_size * height * width)),
            mask_weight=self.mask_weight,
            mask_epsilon=self.mask_epsilon,
            logit_weight=self.logit_weight,
            early_stop=self.early_stop,
        )
        per_label = [0.0] * classes
        rows: list[dict[str, Any]] = []
        flagged: list[int] = []
        if candidates:
            masks, patterns, steps = reverse_neuron_triggers(
                model, layer, seed_x, seeds.y, candidates, settings,
                ctx.generator("abs-reverse"), device,
            )  # fmt: skip
            sample = holdout.random_subset(self.max_samples, ctx.generator("abs-reasr"))
            x, y = sample.x, sample.y
            labels = torch.tensor([c.label for c in candidates])
            rates = reasr(
                model, x, y, masks, patterns, labels, ctx.settings.eval_batch_size, device
            )
            for c, rate, mask, step_count in zip(candidates, rates.tolist(), masks, steps.tolist(), strict=True):  # fmt: skip
                rate = 0.0 if math.isnan(rate) else rate
                per_label[c.label] = max(per_label[c.label], rate)
                rows.append(
                    {
                        "layer": layer,
                        "neuron": c.neuron,
                        "label": c.label,
                        "elevation": c.elevation,
                        "share": c.share,
                        "reasr": rate,
                        "mask_l1": float(mask.sum()),
                        "steps": step_count,
                    }
                )
            order = sorted(range(len(rows)), key=lambda i: -rows[i]["reasr"])
            for i in order:
                if rows[i]["reasr"] >= self.reasr_bound and rows[i]["label"] not in flagged:
                    flagged.append(rows[i]["label"])
            plot = plot_reversed_triggers(
                masks,
                patterns,
                [r["label"] for r in rows],
                [r["mask_l1"] for r in rows],
                [r["reasr"] for r in rows],
                flagged,
                ctx.run_dir / "abs_triggers.png",
                self.max_images,
                title=f"ABS reversed triggers per candidate neuron of {layer} "
                "(highest REASR first; red = flagged)",
                score_name="REASR",
                order=order,
            )
            ctx.logger.log_image("abs_triggers", plot)
            save_triggers(
                masks,
                patterns,
                labels,
                masks.flatten(1).sum(1),
                ctx.run_dir / "abs_triggers.safetensors",
            )
        ctx.record(
            reasr=per_label,
            reasr_bound=self.reasr_bound,
            candidates=rows,
            layer=layer,
            seed_images=len(seeds),
            stimulation_s=stimulated - started,
            reverse_s=time.perf_counter() - stimulated,
        )
        # ABS scores a model by its best candidate's REASR; the anomaly index is the REASR
        return Verdict(flagged, per_label, max(per_label))

    def inspect_model(self, model: nn.Module, data: RunData, ctx: RunContext) -> Verdict:
        """Inspect the model on the clean holdout (the model itself is left as it is)."""
        return self.analyse(model, data.holdout, ctx)
