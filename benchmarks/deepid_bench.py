"""CSAW-HackML DeepID on CPU: Keras import time, forward throughput, Neural Cleanse per label.

Import: `bdrun.models.from_keras_h5` on a real CSAW weights file when one is at --weights (default:
../shared/data/csaw/lab3_bd_weights.h5 beside the project), else on a Keras-layout file of the
same shape written from a seeded PyTorch DeepID (1,283 classes). Forward: images/s of the
1,283-class DeepID in eval mode under torch.no_grad, per batch size. Medians of --repeats runs.
Neural Cleanse: bdrun's label-batched trigger reversal (bdrun.defenses.trigger_reversal, the
authors' settings: 1000 samples per step in mini-batches of 32) on the 1,283-class DeepID with
synthetic 55x47x3 images, --nc-steps steps for --nc-labels labels (no early stop), per label
batch size; seconds per label per step, and the whole 1,283 labels at --nc-full-steps steps.

    .venv/bin/python benchmarks/deepid_bench.py [--threads 2] [--repeats 5] [--nc-labels 16]
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import tempfile
import time
from pathlib import Path

import h5py
import numpy as np
import torch

from bdrun.models import from_keras_h5
from bdrun.models.deepid import DeepID

DEFAULT_WEIGHTS = Path(__file__).resolve().parents[2] / "shared/data/csaw/lab3_bd_weights.h5"


def write_synthetic_keras_file(path: Path) -> Path:
    """A weights-only Keras 2 file with CSAW's layer names and shapes (seeded values)."""
    torch.manual_seed(0)
    model = DeepID(num_classes=1283)
    with h5py.File(path, "w") as f:
        names = [n for n, m in model.named_children() if hasattr(m, "weight")]
        f.attrs["layer_names"] = np.array([n.encode() for n in names])
        for name in names:
            module = getattr(model, name)
            weight = module.weight.detach()
            # layout only matters for shapes here: conv (kh,kw,in,out), dense (in,out)
            kernel = weight.permute(2, 3, 1, 0) if weight.dim() == 4 else weight.T
            group = f.create_group(name)
            group.attrs["weight_names"] = np.array(
                [f"{name}/kernel:0".encode(), f"{name}/bias:0".encode()]
            )
            group[f"{name}/kernel:0"] = kernel.numpy()
            group[f"{name}/bias:0"] = module.bias.detach().numpy()
    return path


def median_seconds(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        fn()
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--weights", type=Path, default=DEFAULT_WEIGHTS)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: all)")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 32, 256, 1024])
    parser.add_argument("--images", type=int, default=4096, help="images per throughput run")
    parser.add_argument("--nc-labels", type=int, default=16, help="0 skips Neural Cleanse")
    parser.add_argument("--nc-steps", type=int, default=2)
    parser.add_argument("--nc-label-batches", type=int, nargs="+", default=[16, 1])
    parser.add_argument("--nc-full-steps", type=int, default=100, help="for the extrapolation")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")

    with tempfile.TemporaryDirectory() as tmp:
        weights = args.weights
        if not weights.is_file():
            weights = write_synthetic_keras_file(Path(tmp) / "synthetic_bd_weights.h5")
            print(f"no CSAW file at {args.weights}; using a synthetic file of the same shape")
        from_keras_h5(weights)  # warm-up: imports, first allocation
        seconds = median_seconds(lambda: from_keras_h5(weights), args.repeats)
        size_mb = weights.stat().st_size / 1e6
        print(f"import {weights.name} ({size_mb:.1f} MB): {1000 * seconds:.1f} ms (median)")

    model = DeepID(num_classes=1283).eval()
    x = torch.rand(args.images, 3, 55, 47, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        for batch in args.batch_sizes:
            n = min(args.images, max(batch * 8, 256))

            def forward(batch=batch, n=n) -> None:
                for start in range(0, n, batch):
                    model(x[start : start + batch])

            forward()  # warm-up
            seconds = median_seconds(forward, args.repeats)
            print(f"forward batch {batch:>5}: {n / seconds:>9.0f} images/s")
    if args.nc_labels:
        neural_cleanse(model, args)


def neural_cleanse(model: DeepID, args: argparse.Namespace) -> None:
    try:
        from bdrun.config import component
        from bdrun.defenses.trigger_reversal import reverse_triggers
    except ImportError:
        print("neural cleanse: bdrun.defenses.trigger_reversal is not available")
        return
    holdout = torch.rand(1000, 3, 55, 47, generator=torch.Generator().manual_seed(1))
    labels = torch.arange(args.nc_labels)
    for label_batch in args.nc_label_batches:
        settings = dataclasses.replace(
            component("defense", "neural_cleanse").settings,
            steps=args.nc_steps,
            early_stop=False,
            label_batch=label_batch,
        )
        result = reverse_triggers(
            model, holdout, labels, settings, torch.Generator().manual_seed(0)
        )
        label_steps = int(result.steps.sum())
        per = result.seconds / label_steps
        full_h = per * 1283 * args.nc_full_steps / 3600
        print(
            f"neural cleanse label_batch {label_batch:>3}: {per:.2f} s per label per step "
            f"({label_steps} label-steps in {result.seconds:.1f} s); 1283 labels x "
            f"{args.nc_full_steps} steps ~ {full_h:.1f} h"
        )


if __name__ == "__main__":
    main()
