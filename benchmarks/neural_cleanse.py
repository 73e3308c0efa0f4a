"""Neural Cleanse reverse-engineering speed: seconds per label and step, one label at a time
versus labels batched together, on the CSAW DeepID net (1,283 classes) or another model.

    python benchmarks/neural_cleanse.py                       # DeepID, 1283 classes, CPU
    python benchmarks/neural_cleanse.py --model small_cnn --shape 1 28 28 --classes 10
    python benchmarks/neural_cleanse.py --device cuda --label-batches 1 64 256

The model has random weights and the clean images are random: the cost of a step does not
depend on either (early stopping, which does, is switched off). Figures printed: seconds per
label per step at the benchmark's samples_per_step, the same scaled to the authors' 1000
samples per step, and the projected time to scan every label for `--project-steps` steps
(the authors cap at 1000; their early stop usually ends far sooner, ~80-90 steps here on
Fashion-MNIST / digits BadNets models).
"""

from __future__ import annotations

import argparse
import dataclasses
import time

import torch

from bdrun.config import build, component
from bdrun.defenses.trigger_reversal import reverse_triggers
from bdrun.rng import generator

MODELS = {
    "deepid": "bdrun.models.deepid.DeepID",
    "small_cnn": "bdrun.models.small_cnn.SmallCNN",
    "lenet": "bdrun.models.lenet.LeNet5",
    "preact_resnet18": "bdrun.models.preact_resnet.PreActResNet18",
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="deepid", choices=sorted(MODELS))
    parser.add_argument("--shape", type=int, nargs=3, default=[3, 55, 47])
    parser.add_argument("--classes", type=int, default=1283)
    parser.add_argument("--labels", type=int, default=32, help="labels timed (a sample)")
    parser.add_argument("--label-batches", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--samples-per-step", type=int, default=256)
    parser.add_argument("--images", type=int, default=512)
    parser.add_argument("--project-steps", type=int, default=90)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = build(
            {"_target_": MODELS[args.model]},
            "model",
            in_shape=args.shape,
            num_classes=args.classes,
            mean=None,
            std=None,
        )
    images = (torch.rand(args.images, *args.shape, generator=generator(0, "bench")) * 255).to(
        torch.uint8
    )
    labels = torch.arange(min(args.labels, args.classes))
    print(
        f"{args.model} {tuple(args.shape)} {args.classes} classes on {args.device}, "
        f"{len(labels)} labels x {args.steps} steps x {args.samples_per_step} samples, "
        f"{torch.get_num_threads()} threads"
    )
    baseline = None
    for label_batch in args.label_batches:
        settings = dataclasses.replace(
            component("defense", "neural_cleanse").settings,
            steps=args.steps,
            samples_per_step=args.samples_per_step,
            early_stop=False,
            label_batch=label_batch,
        )
        started = time.perf_counter()
        reverse_triggers(model, images, labels, settings, generator(0, "nc"), args.device)
        if args.device.startswith("cuda"):
            torch.cuda.synchronize()
        seconds = time.perf_counter() - started
        per_label_step = seconds / (len(labels) * args.steps)
        authors = per_label_step * 1000 / args.samples_per_step
        baseline = baseline or per_label_step
        print(
            f"label_batch {label_batch:4d}: {per_label_step * 1e3:8.1f} ms per label-step "
            f"({authors * 1e3:8.1f} ms at 1000 samples/step), speed-up x{baseline / per_label_step:.2f}; "
            f"all {args.classes} labels x {args.project_steps} steps: "
            f"{authors * args.classes * args.project_steps / 3600:.2f} h"
        )


if __name__ == "__main__":
    main()
