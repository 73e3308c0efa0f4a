"""`bdrun-eval`: run an exported model (a repaired model or a GoodNet) on image or HDF5 files.

    bdrun-eval outputs/.../model test_image.png             # prints one label
    bdrun-eval outputs/.../goodnet data/clean_test_data.h5  # one label per image, in order

Labels go to stdout, one per line, in input order; they lie in [0, N-1] for a repaired model and
in [0, N] for a GoodNet, where N (e.g. 1283 for CSAW-HackML) means "backdoored input". For an
HDF5 file that has labels, the share of predictions equal to them goes to stderr. The export
folder is self-contained (see bdrun.export): no run folder, config or data set is needed.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from bdrun.errors import BdrunError
from bdrun.export import ExportedModel, load_model
from bdrun.finite import check_data

H5_SUFFIXES = (".h5", ".hdf5", ".hdf")


def read_image(path: Path, shape: tuple[int, int, int]) -> Tensor:
    """One image file as [1, C, H, W] in [0, 1]; its size must be the model's."""
    from PIL import Image, UnidentifiedImageError

    channels, height, width = shape
    try:
        with Image.open(path) as image:
            pixels = np.asarray(image.convert("RGB" if channels == 3 else "L"), dtype=np.float32)
    except (UnidentifiedImageError, OSError) as err:
        raise BdrunError(f"cannot read image {path}: {err}") from None
    if pixels.shape[:2] != (height, width):
        raise BdrunError(
            f"{path} is {pixels.shape[1]}x{pixels.shape[0]} pixels; the model takes "
            f"{width}x{height} (width x height): resize it first"
        )
    x = torch.from_numpy(pixels / 255.0)
    x = x.permute(2, 0, 1) if x.ndim == 3 else x.unsqueeze(0)
    return x.unsqueeze(0).contiguous()


def read_h5_images(
    path: Path, x_key: str, y_key: str, layout: str, divide_by: float | None
) -> tuple[Tensor, Tensor | None]:
    """Images [N, C, H, W] in [0, 1] from an HDF5 file, and its labels when it has them."""
    import h5py

    from bdrun.data.h5 import read_h5, to_nchw

    try:
        with h5py.File(path, "r") as f:
            has_labels = y_key in f
            if x_key not in f:
                keys = ", ".join(f.keys()) or "nothing"
                raise BdrunError(f"{path} has no dataset {x_key!r} (it has: {keys}); use --x-key")
            raw = None if has_labels else np.asarray(f[x_key], dtype=np.float32)
    except OSError as err:
        raise BdrunError(f"{path} is not a readable HDF5 file ({err})") from None
    if has_labels:  # the data source's reader checks shapes, labels and the pixel range
        data = read_h5(path, x_key, y_key, layout, divide_by)
        return data.x, data.y
    check_data(raw, f"{path}: {x_key!r}")
    x = to_nchw(raw, layout, path)
    if divide_by:
        x = x / divide_by
    if len(x) and (x.min() < -1e-6 or x.max() > 1 + 1e-6):
        raise BdrunError(
            f"{path}: pixel values span [{x.min():g}, {x.max():g}] after dividing by "
            f"{divide_by}; set --divide-by so they fall in [0, 1]"
        )
    return torch.from_numpy(np.ascontiguousarray(x)), None


def evaluate_file(
    exported: ExportedModel, path: Path, args: argparse.Namespace
) -> tuple[Tensor, Tensor | None]:
    """(predicted labels, stored labels or None) for one input file."""
    if not path.is_file():
        raise BdrunError(f"input file not found: {path}")
    if path.suffix.lower() in H5_SUFFIXES:
        divide_by = args.divide_by if args.divide_by is not None else exported.divide_by
        x, y = read_h5_images(path, args.x_key, args.y_key, args.layout, divide_by)
    else:
        x, y = read_image(path, exported.in_shape), None
    if tuple(x.shape[1:]) != exported.in_shape:
        shape = "x".join(map(str, x.shape[1:]))
        raise BdrunError(
            f"{path} holds {shape} images; the model takes {'x'.join(map(str, exported.in_shape))}"
        )
    return exported.predict(x, args.batch_size), y


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="bdrun-eval",
        description="Label images with a model exported by bdrun (a repaired model or a GoodNet). "
        "Prints one label per line; a GoodNet answers N (its class count) for inputs it flags.",
    )
    p.add_argument("model", type=Path, help="export folder (holds model.json)")
    p.add_argument("inputs", type=Path, nargs="+", help="image files and/or HDF5 files")
    p.add_argument("--x-key", default="data", help="HDF5 dataset of images (default: data)")
    p.add_argument("--y-key", default="label", help="HDF5 dataset of labels (default: label)")
    p.add_argument("--layout", default="auto", choices=("auto", "nhwc", "nchw"))
    p.add_argument(
        "--divide-by",
        type=float,
        default=None,
        help="maps HDF5 pixel values to [0, 1] (default: as exported, 255 for CSAW data)",
    )
    p.add_argument("--batch-size", type=int, default=1024)
    return p


def main(argv: list[str] | None = None) -> int:
    """Console entry point: exit 0, or 2 with one line on stderr for a user error."""
    args = parser().parse_args(argv)
    try:
        if args.batch_size < 1:
            raise BdrunError(f"--batch-size={args.batch_size} must be >= 1")
        with torch.no_grad():  # not torch.set_grad_enabled: callers in-process keep their mode
            exported = load_model(args.model)
            for path in args.inputs:
                labels, stored = evaluate_file(exported, path, args)
                sys.stdout.write("".join(f"{label}\n" for label in labels.tolist()))
                if stored is not None and len(stored):
                    share = float((labels == stored).float().mean())
                    print(
                        f"{path}: {100 * share:.2f}% of {len(stored)} labels match",
                        file=sys.stderr,
                    )
    except BdrunError as err:
        print(f"bdrun-eval: error: {err}", file=sys.stderr)
        return 2
    sys.stdout.flush()
    return 0


if __name__ == "__main__":
    sys.exit(main())
