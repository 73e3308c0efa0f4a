"""NeuronInspect's anomaly index on Fashion-MNIST BadNets and clean models over seeds, with plain
saliency and with SmoothGrad (Smilkov et al. 2017) heatmaps.

The study behind the strict xfail in tests/test_defense_neuron_inspect.py: does any heatmap
choice flag the BadNets target (index > 2) while flagging nothing on a clean model? Each model is
trained once (or read from $BDRUN_CACHE); the 500 holdout images are drawn with their own
generator, not the defense's.

    BDRUN_CACHE=/path/to/cache python scripts/experiments/neuron_inspect_seeds.py \
        --seeds 0 1 2 --noise 0 0.1 0.2
"""

from __future__ import annotations

import argparse
import tempfile

import torch
from hydra import compose, initialize_config_dir
from torch import Tensor, nn

from bdrun.cli import CONF_DIR
from bdrun.data.base import to_float
from bdrun.defenses.neural_cleanse import mad_anomaly_index
from bdrun.defenses.neuron_inspect import (
    combined_feature,
    persistence,
    saliency_maps,
    scale_to_max,
    smoothness,
    sparseness,
)
from bdrun.runner import prepare
from bdrun.training import torch_threads


def label_heatmaps(model: nn.Module, x: Tensor, label: int, noise: float, samples: int) -> Tensor:
    """Saliency of `label`'s logit, averaged over `samples` copies of x with Gaussian noise."""
    generator = torch.Generator().manual_seed(0)
    total = torch.zeros(x.shape[0], *x.shape[2:])
    for _ in range(samples):
        noisy = x + noise * torch.randn(x.shape, generator=generator)
        total += saliency_maps(model, noisy, torch.full((len(x),), label))
    return total / samples


def anomaly_indices(model: nn.Module, x: Tensor, y: Tensor, noise: float) -> list[float]:
    """The defense's default combined feature (mean-map sparseness and smoothness, top-5 %
    persistence, each scaled by its median) -> MAD anomaly index per label."""
    sparse, smooth, persist = [], [], []
    for label in range(int(y.max()) + 1):
        maps = scale_to_max(label_heatmaps(model, x[y != label], label, noise, 16 if noise else 1))
        mean_map = scale_to_max(maps.mean(0)[None])
        sparse.append(float(sparseness(mean_map)))
        smooth.append(float(smoothness(mean_map)))
        persist.append(persistence(maps, 0.05))
    combined = combined_feature(
        torch.tensor(sparse), torch.tensor(smooth), torch.tensor(persist), (1, 1, 1), True
    )
    return [round(float(v), 2) for v in mad_anomaly_index(combined)[0]]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--noise", type=float, nargs="+", default=[0.0, 0.1, 0.2])
    parser.add_argument("--images", type=int, default=500)
    args = parser.parse_args()
    with torch_threads(None):
        for seed in args.seeds:
            for attack in ("badnets", "none"):
                overrides = ["dataset=fashion_mnist", f"attack={attack}", f"seed={seed}"]
                with initialize_config_dir(version_base=None, config_dir=CONF_DIR):
                    cfg = compose("config", overrides=[*overrides, "logger=none"])
                with tempfile.TemporaryDirectory() as run_dir:
                    prepared = prepare(cfg, run_dir)
                draw = torch.Generator().manual_seed(123)
                sample = prepared.data.holdout.random_subset(args.images, draw)
                x = to_float(sample.x)
                for noise in args.noise:
                    index = anomaly_indices(prepared.model, x, sample.y, noise)
                    print(f"seed {seed} attack={attack:7s} noise {noise}: {index}", flush=True)


if __name__ == "__main__":
    main()
