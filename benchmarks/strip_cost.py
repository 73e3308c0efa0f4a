"""STRIP's cost per input: N overlays means N forward passes per input, batched.

Times `StripDetector.entropy` (all N blends of a chunk of inputs in one forward pass) against a
plain forward pass of the same inputs, on one model and input shape, with random weights and
images (the cost does not depend on what the model learned). Prints ms per input, blended images
per second and the ratio to a plain prediction (about N when the model dominates the cost).

    .venv/bin/python benchmarks/strip_cost.py [--inputs 300] [--n-overlays 100]
        [--model small_cnn] [--shape 1 28 28] [--images-per-pass 1024] [--threads 0]
"""

from __future__ import annotations

import argparse
import time

import torch

from bdrun.defenses.strip import StripDetector
from bdrun.metrics import logits_of
from bdrun.models.preact_resnet import PreActResNet18
from bdrun.models.small_cnn import SmallCNN

MODELS = {"small_cnn": SmallCNN, "preact_resnet18": PreActResNet18}


def best_of(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        fn()
        times.append(time.perf_counter() - started)
    return min(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--inputs", type=int, default=300)
    parser.add_argument("--n-overlays", type=int, default=100)
    parser.add_argument("--model", choices=sorted(MODELS), default="small_cnn")
    parser.add_argument("--shape", type=int, nargs=3, default=[1, 28, 28])
    parser.add_argument("--images-per-pass", type=int, default=1024)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: leave as is)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    torch.manual_seed(0)
    shape = tuple(args.shape)
    model = MODELS[args.model](shape, 10).eval()
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 256, (args.inputs, *shape), dtype=torch.uint8, generator=g)
    pool = torch.randint(0, 256, (1000, *shape), dtype=torch.uint8, generator=g)
    detector = StripDetector(
        model,
        pool,
        args.n_overlays,
        1.0,
        1.0,
        True,
        inputs_per_pass=args.images_per_pass // args.n_overlays,
        device="cpu",
        seed=0,
    )
    detector.entropy(x[:2])  # warm-up
    strip_s = best_of(lambda: detector.entropy(x), args.repeats)
    plain_s = best_of(lambda: logits_of(model, x, args.images_per_pass), args.repeats)
    images = args.inputs * args.n_overlays
    print(
        f"STRIP cost: {args.model} {'x'.join(map(str, shape))}, N={args.n_overlays} overlays, "
        f"{args.inputs} inputs, {torch.get_num_threads()} threads"
    )
    print(
        f"  STRIP: {1000 * strip_s / args.inputs:.2f} ms per input, {images / strip_s:,.0f} blends/s"
    )
    print(f"  plain prediction: {1000 * plain_s / args.inputs:.3f} ms per input")
    print(f"  ratio: {strip_s / plain_s:.1f}x (forward passes per input: {args.n_overlays})")


if __name__ == "__main__":
    main()
