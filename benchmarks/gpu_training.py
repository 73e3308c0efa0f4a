"""GPU training throughput: precision, channels-last and GPU-resident data, vs a plain loop.

Trains on synthetic in-memory images shaped like a real data set (uint8, as bdrun holds them)
with bdrun's Lightning `fit` under several trainer settings, and with a plain PyTorch loop that
does the fastest thing by hand (AMP fp16 + GradScaler, channels-last, data on the GPU). One
warm-up epoch per variant (cuDNN autotuning, allocator), then `--epochs` timed epochs; prints
samples/s per variant and the ratio to the plain loop. Needs a CUDA device.

    python benchmarks/gpu_training.py [--shape fmnist|cifar] [--epochs 3] [--batch-size 128]
"""

from __future__ import annotations

import argparse
import copy
import time

import torch
import torch.nn.functional as F

from bdrun.data.base import to_float
from bdrun.data.fake import FakeImages
from bdrun.data.loader import InMemoryLoader
from bdrun.models.preact_resnet import PreActResNet18
from bdrun.models.small_cnn import SmallCNN
from bdrun.training import TrainSettings, fit, hardware_settings, train_settings

SHAPES = {
    "fmnist": ((1, 28, 28), 60000, SmallCNN),
    "cifar": ((3, 32, 32), 50000, PreActResNet18),
}
# name -> (precision, channels_last, data_on_device)
VARIANTS = {
    "fp32": ("32-true", False, False),
    "fp16-mixed + channels-last, host data": ("16-mixed", True, False),
    "fp16-mixed + channels-last, GPU data (trainer=gpu)": ("16-mixed", True, True),
    "bf16-mixed + channels-last, GPU data": ("bf16-mixed", True, True),
}


def plain_loop(model, data, settings: TrainSettings) -> None:
    """SGD + cosine, fp16 autocast with a GradScaler, channels-last, batches gathered on the GPU."""
    device = torch.device("cuda")
    model.to(device, memory_format=torch.channels_last).train()
    opt = torch.optim.SGD(
        model.parameters(),
        lr=settings.lr,
        momentum=settings.momentum,
        weight_decay=settings.weight_decay,
        nesterov=True,
    )
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=settings.epochs)
    scaler = torch.amp.GradScaler("cuda")
    loader = InMemoryLoader(data, settings.batch_size, shuffle=True, seed=0, device=device)
    for _ in range(settings.epochs):
        for x, y, _ in loader:
            x = to_float(x).contiguous(memory_format=torch.channels_last)
            with torch.autocast("cuda", dtype=torch.float16):
                loss = F.cross_entropy(model(x), y)
            opt.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.step(opt)
            scaler.update()
        sched.step()
    torch.cuda.synchronize()


def timed(train, model, epochs: int) -> float:
    """Seconds for `epochs` epochs after a one-epoch warm-up on a copy of the model."""
    train(copy.deepcopy(model), 1)
    torch.cuda.synchronize()
    started = time.perf_counter()
    train(copy.deepcopy(model), epochs)
    torch.cuda.synchronize()
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", choices=sorted(SHAPES), default="fmnist")
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=128)
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("gpu_training.py needs a CUDA device")
    torch.backends.cudnn.benchmark = True

    shape, n, model_class = SHAPES[args.shape]
    data = FakeImages(shape=shape, num_classes=10, n_train=n, n_test=10).load().train
    torch.manual_seed(0)
    initial = model_class(shape, 10)
    print(
        f"{torch.cuda.get_device_name()} | {model_class.__name__} on {n} x {'x'.join(map(str, shape))}"
        f" uint8 images | batch {args.batch_size} | {args.epochs} timed epochs after 1 warm-up"
    )

    def settings(epochs: int) -> TrainSettings:
        return train_settings(epochs=epochs, batch_size=args.batch_size, lr=0.05)

    plain_s = timed(lambda m, e: plain_loop(m, data, settings(e)), initial, args.epochs)
    samples = n * args.epochs
    print(
        f"  {'plain PyTorch loop (fp16 AMP, channels-last, GPU data)':58s} {samples / plain_s:9,.0f} samples/s"
    )
    for name, (precision, channels_last, on_device) in VARIANTS.items():
        hardware = hardware_settings(
            accelerator="gpu",
            precision=precision,
            channels_last=channels_last,
            deterministic=False,
            progress=False,
            data_on_device=on_device,
        )
        seconds = timed(
            lambda m, e, h=hardware: fit(m, data, settings(e), h, seed=0), initial, args.epochs
        )
        print(
            f"  bdrun {name:52s} {samples / seconds:9,.0f} samples/s"
            f"  ({plain_s / seconds:.2f} x plain)"
        )


if __name__ == "__main__":
    main()
