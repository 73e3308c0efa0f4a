"""Cost per input of the run-time detectors STRIP, SentiNet, NIC, SCALE-UP and IBD-PSC.

Scores the same random inputs with each detector (random weights and images: the cost does
not depend on what the model learned) at the digits (1x8x8) and Fashion-MNIST (1x28x28) input
sizes, with each detector's default settings: STRIP N = 100 blends, SentiNet Grad-CAM plus
2 x 100 pastes, NIC the invariants of the small CNN's four layers (fitted first on
`--fit` random images; the fit is timed apart), SCALE-UP five scaled copies, IBD-PSC five
amplified copies of the small CNN with BatchNorm (model=small_cnn_bn; both BN layers
amplified, the depths its holdout search ends at on these models). Prints ms per input and the
ratio to a plain prediction.

    .venv/bin/python benchmarks/detector_cost.py [--inputs 200] [--fit 1000] [--threads 1]
"""

from __future__ import annotations

import argparse
import time

import torch
from strip_cost import best_of  # the script's folder is on sys.path

from bdrun.defenses.ibd_psc import IbdPscDetector
from bdrun.defenses.nic import NicDetector, default_layers
from bdrun.defenses.scale_up import ScaleUpDetector
from bdrun.defenses.sentinet import SentinetDetector, last_feature_map
from bdrun.defenses.strip import StripDetector
from bdrun.metrics import logits_of
from bdrun.models.small_cnn import SmallCNN

SHAPES = {"digits": (1, 8, 8), "fashion_mnist": (1, 28, 28)}
BATCH = 1024  # the default eval_batch_size


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--inputs", type=int, default=200)
    parser.add_argument("--fit", type=int, default=1000, help="random images NIC is fitted on")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: leave as is)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"detector cost: small_cnn, {args.inputs} inputs, {torch.get_num_threads()} threads")
    for name, shape in SHAPES.items():
        torch.manual_seed(0)
        model = SmallCNN(shape, 10).eval()
        bn_model = SmallCNN(shape, 10, batch_norm=True).eval()
        g = torch.Generator().manual_seed(0)
        x = torch.randint(0, 256, (args.inputs, *shape), dtype=torch.uint8, generator=g)
        pool = torch.randint(0, 256, (1000, *shape), dtype=torch.uint8, generator=g)
        strip = StripDetector(model, pool, 100, 1.0, 1.0, True, BATCH // 100, "cpu", seed=0)
        layer = last_feature_map(model, pool[:2].float() / 255)
        noise = torch.rand(100, *shape, generator=g)
        sentinet = SentinetDetector(
            model, layer, pool[:100], noise, 0, 0.85, "region", BATCH // 200, BATCH, "cpu"
        )
        nic = NicDetector(
            model, default_layers(model), "ocsvm", 0.1, 0.01, 0.1, "scale", 256, BATCH, "cpu", 0
        )
        fit_started = time.perf_counter()
        fit = torch.randint(0, 256, (args.fit, *shape), dtype=torch.uint8, generator=g)
        labels = torch.arange(args.fit // 2) % 10
        nic.fit_invariants(fit[: args.fit // 2], labels)  # random weights predict one class
        nic.fit_final(fit[args.fit // 2 :])
        fit_s = time.perf_counter() - fit_started
        plain_s = best_of(lambda m=model, xs=x: logits_of(m, xs, BATCH), args.repeats)
        print(
            f"  {name} {'x'.join(map(str, shape))}: plain prediction "
            f"{1000 * plain_s / args.inputs:.3f} ms/input"
        )
        scale_up = ScaleUpDetector(model, [3, 5, 7, 9, 11], "none", BATCH, "cpu")
        ibd_psc = IbdPscDetector(bn_model, [2] * 5, 1.5, 0.9, BATCH, "cpu")
        detectors = (
            ("STRIP", strip),
            ("SentiNet", sentinet),
            ("NIC", nic),
            ("SCALE-UP", scale_up),
            ("IBD-PSC", ibd_psc),
        )
        for label, detector in detectors:
            detector.score(x[:2])  # warm-up
            seconds = best_of(lambda d=detector, xs=x: d.score(xs), args.repeats)
            print(
                f"    {label:9s} {1000 * seconds / args.inputs:8.2f} ms/input "
                f"({seconds / plain_s:,.0f}x a plain prediction)"
            )
        print(f"    (NIC fit on {args.fit} images: {fit_s:.1f} s)")


if __name__ == "__main__":
    main()
