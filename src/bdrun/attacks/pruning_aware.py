"""Pruning-aware attack (Liu et al. 2018, Fine-Pruning section 3.3): a backdoor built to survive pruning."""

from __future__ import annotations

import copy
from typing import TYPE_CHECKING

import torch
from torch import Tensor, nn

from bdrun.attacks.badnets import BadNets
from bdrun.data.base import DataInfo, ImageSet
from bdrun.errors import BdrunError
from bdrun.models.probes import channel_stats, get_module

if TYPE_CHECKING:
    from bdrun.context import RunContext


def mask_channels(model: nn.Module, layer: str, keep: Tensor) -> torch.utils.hooks.RemovableHandle:
    """Zero the output channels of `layer` where keep is False (pruned), with a forward hook."""
    scale = keep.float().view(1, -1, 1, 1)
    return get_module(model, layer).register_forward_hook(
        lambda _m, _i, out: out * scale.to(out.device, out.dtype)
    )


class PruningAware(BadNets):
    """BadNets trained the pruning-aware way, so that pruning defenses cannot separate the
    backdoor from clean behaviour.

    Liu, Dolan-Gavitt and Garg 2018 ("Fine-Pruning: Defending Against Backdooring Attacks on
    Deep Neural Networks"), section 3.3: (1) train on clean data; (2) prune the channels of the
    last conv layer that are most dormant on clean inputs; (3) retrain the pruned network on the
    poisoned data, so backdoor and clean tasks share the remaining channels; (4) re-instate the
    pruned channels with their clean weights and biases lowered until they stay dormant on clean
    and backdoored inputs. Every training stage runs through `ctx.train_cached` (stage 1 is the
    shared "surrogate" clean model), and `pretrained(poisoned_train, ctx)` hands the result to the pipeline.
    The trigger and its settings are BadNets'.

    Parameters:
        prune_ratio: share of the layer's channels pruned in step 2 (the paper leaves the
            number to the attacker; 0.5 keeps enough for the small CNN to learn both tasks).
        layer: the conv layer to prune; null = the model's `prune_layer`, ranked by the
            activations of its `rank_layer` (the Fine-Pruning defense's choice). The layer must
            be a Conv2d with a bias that a ReLU follows.
        dormancy_margin: the re-instated biases are lowered by (1 + margin) times the channel's
            peak pre-activation on the attacker's clean and poisoned training data, so the
            channels stay dormant with room to spare on unseen inputs.
    """

    name = "pruning_aware"

    def __init__(
        self,
        prune_ratio: float,
        layer: str | None,
        dormancy_margin: float,
        **badnets,
    ) -> None:
        super().__init__(**badnets)
        self.prune_ratio = float(prune_ratio)
        self.layer = layer
        self.dormancy_margin = float(dormancy_margin)

    def setup(self, info: DataInfo, seed: int) -> None:
        super().setup(info, seed)
        if not 0 < self.prune_ratio < 1:
            raise BdrunError(f"attack.prune_ratio={self.prune_ratio} must be in (0, 1)")
        if self.dormancy_margin < 0:
            raise BdrunError(f"attack.dormancy_margin={self.dormancy_margin} must be >= 0")

    def layers(self, model: nn.Module) -> tuple[str, str]:
        """(conv layer to prune, layer whose activations rank its channels)."""
        layer = self.layer or getattr(model, "prune_layer", "")
        rank = getattr(model, "rank_layer", "") if not self.layer else self.layer
        conv = get_module(model, layer) if layer else None
        if not isinstance(conv, nn.Conv2d) or conv.bias is None:
            raise BdrunError(
                f"attack=pruning_aware needs a Conv2d layer with a bias to prune; "
                f"{type(model).__name__}.{layer or '<none>'} is not one (set attack.layer)"
            )
        return layer, rank or layer

    def fit(self, clean_train: ImageSet, test: ImageSet, ctx: RunContext) -> None:
        self._clean_train = clean_train  # stage 1 trains on it; stage 4 checks dormancy on it

    def pretrained(self, poisoned_train: ImageSet, ctx: RunContext) -> nn.Module:
        clean_train = self._clean_train
        batch, device = ctx.settings.eval_batch_size, ctx.device
        # (1) the clean model, shared with other attacks that need one
        clean_model, clean_status = ctx.train_cached(clean_train, stream="surrogate")
        layer, rank_layer = self.layers(clean_model)
        # (2) prune the channels most dormant on clean inputs
        mean_activation, _ = channel_stats(clean_model, rank_layer, clean_train.x, batch, device)
        channels = len(mean_activation)
        pruned = mean_activation.argsort()[: round(self.prune_ratio * channels)]
        keep = torch.ones(channels, dtype=torch.bool)
        keep[pruned] = False
        # (3) retrain the pruned network on the poisoned data (pruned channels held at zero)
        pruned_model = copy.deepcopy(clean_model)
        handle = mask_channels(pruned_model, layer, keep)
        try:
            retrained, retrain_status = ctx.train_cached(
                poisoned_train,
                model=pruned_model,
                stream="pruning-aware",
                extra_key={"pruned": keep.tolist(), "layer": layer},
            )
        finally:
            handle.remove()
        self.stage_status = {"clean": clean_status, "retrain": retrain_status}
        self.pruned_channels = sorted(pruned.tolist())
        # (4) re-instate the pruned channels, dormant on the attacker's clean and poisoned data
        model = copy.deepcopy(retrained)
        conv, clean_conv = get_module(model, layer), get_module(clean_model, layer)
        with torch.no_grad():
            conv.weight[~keep] = clean_conv.weight[~keep]
            conv.bias[~keep] = clean_conv.bias[~keep]
            peaks = torch.maximum(
                channel_stats(model, layer, clean_train.x, batch, device)[1],
                channel_stats(model, layer, poisoned_train.x, batch, device)[1],
            )
            conv.bias[~keep] -= peaks[~keep].clamp_min(0) * (1 + self.dormancy_margin)
        return model.eval()
