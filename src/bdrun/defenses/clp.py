"""CLP: data-free pruning of the conv channels with an outsized channel Lipschitz bound (repair).

Zheng, Tang, Li & Liu, "Data-free Backdoor Removal based on Channel Lipschitzness", ECCV 2022,
and the authors' code (github.com/rkteddy/channel-Lipschitzness-based-pruning, defense.py
`CLP`, test.py's `-u` default of 3). A channel that a trigger switches on has to amplify a small
input change into a large one, so its upper bound of the channel Lipschitz constant (UCLC)
stands out from the other channels of its layer. CLP needs neither data nor training.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import Tensor, nn

from bdrun.defenses.base import NOTHING_CARRIED, Carried, Defense
from bdrun.defenses.pruning import copy_model
from bdrun.validate import coerce

if TYPE_CHECKING:
    from bdrun.context import RunContext
    from bdrun.state import RunData


@dataclass(frozen=True)
class ConvSite:
    """A Conv2d and the BatchNorm2d that follows it (None when none does)."""

    conv_name: str
    conv: nn.Conv2d
    bn: nn.BatchNorm2d | None


def conv_sites(model: nn.Module) -> list[ConvSite]:
    """Every Conv2d of `model` in module order, each paired with the BatchNorm2d registered
    next after it when that BN has one feature per output channel of the conv (the authors pair
    each BN with the last conv seen before it)."""
    sites: list[ConvSite] = []
    for name, module in model.named_modules():
        if isinstance(module, nn.Conv2d):
            sites.append(ConvSite(name, module, None))
        elif isinstance(module, nn.BatchNorm2d) and sites and sites[-1].bn is None:
            last = sites[-1]
            if last.conv.out_channels == module.num_features:
                sites[-1] = ConvSite(last.conv_name, last.conv, module)
    return sites


@torch.no_grad()
def channel_bounds(site: ConvSite) -> Tensor:
    """The UCLC of every output channel: the largest singular value of its conv kernel as an
    [in_channels, k*k] matrix, times |gamma / sqrt(running_var)| of the BN after it (the
    authors' code takes running_var.sqrt() without BN's eps; a conv without BN: the kernel's
    alone, which bounds the channel's Lipschitz constant just the same)."""
    weight = site.conv.weight.detach().float()
    kernels = weight.reshape(weight.shape[0], weight.shape[1], -1)
    bounds = torch.linalg.matrix_norm(kernels, ord=2).cpu()
    if site.bn is not None:
        bn = site.bn
        bounds = bounds * (bn.weight.detach().float() / bn.running_var.float().sqrt()).abs().cpu()
    return bounds


def outsized(bounds: Tensor, u: float) -> Tensor:
    """Bool mask of the channels whose bound exceeds mean + u * std of their layer (torch's
    unbiased std, as the authors' channel_lips.std())."""
    if len(bounds) < 2:
        return torch.zeros(len(bounds), dtype=torch.bool)
    return bounds > bounds.mean() + u * bounds.std()


@torch.no_grad()
def prune_channels(site: ConvSite, mask: Tensor) -> None:
    """Make the masked output channels zero: the BN's weight and bias (the authors'), or for a
    conv without BN the conv's kernel and bias."""
    target = site.bn if site.bn is not None else site.conv
    index = mask.nonzero().flatten().to(target.weight.device)
    target.weight[index] = 0
    if target.bias is not None:
        target.bias[index] = 0


class Clp(Defense):
    """Channel Lipschitzness-based Pruning: data-free repair, prunes in every conv layer.

    For each Conv2d (followed by a BatchNorm2d, as in the paper's networks; model=small_cnn_bn
    for the small CNN) every output channel's UCLC is computed (`channel_bounds`); the channels
    whose UCLC exceeds the mean plus `u` standard deviations of their layer are pruned. Convs
    without a BN behind them (the plain small CNN) are bounded by their kernel alone and pruned
    by zeroing it, as the conv-only variant of the authors' CLP does; the paper's method and its
    figures are for conv + BN. Records, per conv layer, the channels pruned
    (`clp_pruned`) and whether a BN entered the bound (`clp_with_bn`).

    Parameters (defaults from the authors' code):
        u: the threshold in standard deviations (test.py's `-u`, default 3; the paper's u = 3).
    """

    name = "clp"

    def __init__(self, u: float) -> None:
        self.u = coerce(u, "float", "defense.u")

    def repair(
        self, model: nn.Module, data: RunData, ctx: RunContext, carried: Carried = NOTHING_CARRIED
    ) -> nn.Module:
        repaired = copy_model(model).eval()
        pruned: dict[str, int] = {}
        with_bn: dict[str, bool] = {}
        for site in conv_sites(repaired):
            mask = outsized(channel_bounds(site), self.u)
            prune_channels(site, mask)
            pruned[site.conv_name] = int(mask.sum())
            with_bn[site.conv_name] = site.bn is not None
        ctx.record(clp_pruned=pruned, clp_pruned_total=sum(pruned.values()), clp_with_bn=with_bn)
        return repaired
