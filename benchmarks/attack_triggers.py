"""Throughput of the attack suite's batched triggers: images per second, no training.

.venv/bin/python benchmarks/attack_triggers.py [--n 10000] [--shape 1 28 28] [--threads 1]

Data-time triggers (blend, SIG, the label-consistent corner, the WaNet warp, Refool's
reflections, the adaptive attacks' test and training triggers, Narcissus' magnified
perturbation, BppAttack's squeezing with and without dithering, FTrojan's pattern, the
low-frequency trigger, the blind backdoor's pattern) run once over the in-memory tensor; the
input-aware generator, the label-consistent PGD and the low-frequency attack's DeepFool (per
step, on a small CNN) are the costly ones and are timed per image too. Narcissus' trigger
optimisation (per pass over a 350-image target batch) is timed on the small CNN as well.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable

import torch

from bdrun.attacks.bpp import floyd_steinberg, squeeze
from bdrun.attacks.clean_label import corner_trigger, pgd
from bdrun.attacks.generators import TriggerNet
from bdrun.attacks.input_aware import stamp_generated
from bdrun.attacks.lf import targeted_deepfool
from bdrun.attacks.narcissus import optimise_trigger
from bdrun.attacks.triggers import blend, identity_grid, sinusoid, warp
from bdrun.attacks.wanet import warping_field
from bdrun.config import component
from bdrun.data.base import DataInfo
from bdrun.models.small_cnn import SmallCNN


def rate(fn: Callable[[], object], n: int, repeats: int = 3) -> float:
    """Best-of-`repeats` images per second of fn over n images."""
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return n / best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=10000)
    parser.add_argument("--shape", type=int, nargs=3, default=[1, 28, 28])
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    shape, n = tuple(args.shape), args.n
    x = torch.rand(n, *shape)
    g = torch.Generator().manual_seed(0)
    key = torch.rand(shape, generator=g)
    wave = sinusoid(shape, 40 / 255, 6)
    signs = corner_trigger("bottom_right", *shape[1:])
    grid = identity_grid(*shape[1:]) + 0.5 * warping_field(4, *shape[1:], g) / shape[1]
    patterns, masks = TriggerNet(shape).eval(), TriggerNet(shape, 1).eval()
    model = SmallCNN(shape, 10).eval()
    y = torch.randint(10, (512,), generator=g)
    info = DataInfo("bench", shape, 10)
    attacks = {}
    for name in ("refool", "adaptive_blend", "adaptive_patch"):
        attacks[name] = component("attack", name)
        attacks[name].setup(info, 0)
    narcissus_trigger = 16 / 255 * (2 * torch.rand(shape, generator=g) - 1)
    ftrojan, blind = component("attack", "ftrojan"), component("attack", "blind")
    ftrojan.setup(info, 0)
    blind.setup(info, 0)
    smooth = key * 0.2  # the low-frequency trigger is an additive pattern like this one

    with torch.no_grad():
        figures = {
            "blend": rate(lambda: blend(x, key, 0.2), n),
            "sig": rate(lambda: (x + wave).clamp_(0, 1), n),
            "clean_label trigger": rate(lambda: torch.where(signs != 0, (signs + 1) / 2, x), n),
            "wanet warp": rate(lambda: warp(x, grid), n),
            "bpp squeeze": rate(lambda: squeeze(x, 8), n),
            "bpp squeeze + dithering": rate(lambda: floyd_steinberg(x, 8), n),
            "ftrojan": rate(lambda: ftrojan.apply_trigger(x), n),
            "lf trigger": rate(lambda: (x + smooth).clamp_(0, 1), n),
            "blind pattern": rate(lambda: blind.apply_trigger(x), n),
            "input_aware generator": rate(
                lambda: [stamp_generated(b, b, patterns, masks) for b in x.split(1024)], n, 1
            ),
            "refool reflections": rate(lambda: attacks["refool"].apply_trigger(x), n, 1),
            "adaptive_blend test": rate(lambda: attacks["adaptive_blend"].apply_trigger(x), n),
            "adaptive_blend training": rate(
                lambda: attacks["adaptive_blend"].training_trigger(x, g), n
            ),
            "adaptive_patch test": rate(lambda: attacks["adaptive_patch"].apply_trigger(x), n),
            "adaptive_patch training": rate(
                lambda: attacks["adaptive_patch"].training_trigger(x, g), n
            ),
            "narcissus x3": rate(lambda: (x + 3 * narcissus_trigger).clamp_(0, 1), n),
        }
    figures["narcissus optimisation (per pass)"] = rate(
        lambda: optimise_trigger(model, x[:350], 0, 16 / 255, 1, 0.01, 350, g), 350, 2
    )  # best of two: the first optimizer step imports more of torch
    figures["clean_label PGD (per step)"] = 20 * rate(
        lambda: pgd(model, x[:512], y, 300 / 255, 20, 2.5 * (300 / 255) / 20, "l2"), 512, 1
    )
    figures["lf DeepFool (per step)"] = rate(
        lambda: [targeted_deepfool(model, image, 0, 0.02, 1) for image in x[:64]], 64, 1
    )
    print(f"{n} images of shape {list(shape)}, {args.threads} thread(s):")
    for name, per_second in figures.items():
        print(f"  {name:28s} {per_second:14,.0f} images/s")


if __name__ == "__main__":
    main()
