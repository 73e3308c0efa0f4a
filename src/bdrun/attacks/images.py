"""Natural images that some triggers need (reflections, public out-of-distribution data), from
what this machine has offline or from a folder the user names.

Sources:
- `sample_images`: square crops of scikit-learn's two bundled colour photos
  (sklearn/datasets/images/china.jpg and flower.jpg, 427x640), drawn with a seeded generator and
  resized to the data's size (grey data: the channel mean). A crop's label is its photo and the
  quadrant of the photo its centre lies in (8 labels).
- `digits`: scikit-learn's 1,797 bundled handwritten digits (8x8 grey, bdrun.data.digits),
  resized; labels 0-9.
- `fashion_mnist`: Fashion-MNIST's 60,000 training images, found where bdrun.data.idx looks
  (Debian's dataset-fashion-mnist, /usr/share/datasets/fashion-mnist; never downloaded here);
  labels 0-9.
- a folder (`attack.images=PATH`): every PNG / JPEG / BMP file in it, read with the project's
  image reader (bdrun.attacks.triggers.load_image, Pillow; nothing is unpickled); each subfolder
  is one label (ImageFolder's layout), files at the top level share one label.
- `auto`: digits <-> Fashion-MNIST for grey data (the other of the two; sample_images when
  Fashion-MNIST is not installed), sample_images for colour data.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor

from bdrun.data.base import DataInfo, to_float
from bdrun.errors import BdrunError

SOURCES = ("auto", "sample_images", "digits", "fashion_mnist")
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp")
SAMPLE_PHOTOS = ("china.jpg", "flower.jpg")
# crop sides as fractions of a photo's shorter side (the photos are 427 px high)
CROP_FRACTIONS = (0.125, 0.5)


def fit_shape(x: Tensor, shape: tuple[int, int, int]) -> Tensor:
    """Float images [N, c, h, w] in [0, 1] as [N, C, H, W]: grey <- colour by the channel mean,
    colour <- grey by repetition, resized with antialiased bilinear interpolation."""
    channels, height, width = shape
    if x.shape[1] != channels:
        if channels == 1:
            x = x.mean(1, keepdim=True)
        elif x.shape[1] == 1:
            x = x.expand(-1, channels, -1, -1)
        else:
            raise BdrunError(
                f"images with {x.shape[1]} channels cannot feed {channels}-channel data"
            )
    if tuple(x.shape[2:]) != (height, width):
        x = F.interpolate(x, size=(height, width), mode="bilinear", antialias=True)
    return x.clamp(0, 1).contiguous()


def sklearn_images_folder() -> Path:
    """scikit-learn's folder of bundled photos (found without importing scikit-learn)."""
    spec = importlib.util.find_spec("sklearn")
    folders = spec.submodule_search_locations if spec is not None else None
    folder = Path(folders[0]) / "datasets" / "images" if folders else None
    if folder is None or not all((folder / name).is_file() for name in SAMPLE_PHOTOS):
        raise BdrunError(
            "scikit-learn's sample photos (china.jpg, flower.jpg) are not installed; "
            "point attack.images at a folder of PNG/JPEG files"
        )
    return folder


def sample_image_crops(
    count: int, shape: tuple[int, int, int], g: torch.Generator
) -> tuple[Tensor, Tensor]:
    """`count` seeded square crops of scikit-learn's two photos as ([count, C, H, W], labels).

    Each photo is first shrunk (antialiased) so that a crop of the middle size maps onto the
    data's size; crops are then sampled with bilinear grid_sample, all at once."""
    from bdrun.attacks.triggers import load_image

    _, height, width = shape
    folder = sklearn_images_folder()
    low, high = CROP_FRACTIONS
    photo_of = torch.randint(len(SAMPLE_PHOTOS), (count,), generator=g)
    side = low + (high - low) * torch.rand(count, generator=g)  # of the shorter side
    centre = torch.rand(count, 2, generator=g)
    images, labels = (
        torch.empty(count, shape[0], height, width),
        torch.empty(count, dtype=torch.long),
    )
    for index, name in enumerate(SAMPLE_PHOTOS):
        chosen = (photo_of == index).nonzero().flatten()
        if not len(chosen):
            continue
        photo, _ = load_image(folder / name, 3)
        rows, cols = photo.shape[1:]
        short = min(rows, cols)
        scale = max(height, width) / (short * (low + high) / 2)
        photo = fit_shape(photo[None], (shape[0], round(rows * scale), round(cols * scale)))
        # crop geometry in the normalised [-1, 1] coordinates of grid_sample
        half_x = side[chosen] * short / cols
        half_y = side[chosen] * short / rows
        cx = (2 * centre[chosen, 0] - 1) * (1 - half_x)
        cy = (2 * centre[chosen, 1] - 1) * (1 - half_y)
        theta = torch.zeros(len(chosen), 2, 3)
        theta[:, 0, 0], theta[:, 0, 2] = half_x, cx
        theta[:, 1, 1], theta[:, 1, 2] = half_y, cy
        grid = F.affine_grid(theta, [len(chosen), shape[0], height, width], align_corners=False)
        images[chosen] = F.grid_sample(
            photo.expand(len(chosen), -1, -1, -1), grid, mode="bilinear", align_corners=False
        ).clamp(0, 1)
        labels[chosen] = index * 4 + (cy > 0).long() * 2 + (cx > 0).long()
    return images, labels


def image_files(path: str | Path, key: str) -> list[Path]:
    """The image files under `path` (subfolders too), sorted, or a one-line error naming
    attack.<key> when the folder is missing or holds none."""
    folder = Path(path).expanduser()
    if not folder.is_dir():
        raise BdrunError(f"attack.{key}={path}: no such folder (a folder of PNG/JPEG files)")
    files = sorted(
        p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES
    )
    if not files:
        raise BdrunError(
            f"attack.{key}={path} holds no {'/'.join(s[1:] for s in IMAGE_SUFFIXES)} files"
        )
    return files


def folder_images(path: str | Path, shape: tuple[int, int, int], key: str) -> tuple[Tensor, Tensor]:
    """Every image file under `path` (sorted), fitted to `shape`, with one label per subfolder."""
    from bdrun.attacks.triggers import load_image

    files = image_files(path, key)
    groups = sorted({p.parent for p in files})
    images = [fit_shape(load_image(p, 3)[0][None], shape) for p in files]
    labels = torch.tensor([groups.index(p.parent) for p in files])
    return torch.cat(images), labels


def dataset_images(name: str, shape: tuple[int, int, int]) -> tuple[Tensor, Tensor]:
    """The training images of one of the offline data sets, fitted to `shape`, with labels."""
    if name == "digits":
        from bdrun.data.digits import digits_arrays

        images, labels = digits_arrays()
        x = torch.from_numpy(images).float().div(16.0).unsqueeze(1)
        return fit_shape(x, shape), torch.from_numpy(labels).long()
    from bdrun.data.idx import FashionMNIST

    data = FashionMNIST(download=False).load().train
    return fit_shape(to_float(data.x), shape), data.y


def fashion_mnist_available() -> bool:
    from bdrun.data.idx import FashionMNIST

    source = FashionMNIST(download=False)
    return all(
        source._find(stem) is not None
        for stem in ("train-images-idx3-ubyte", "train-labels-idx1-ubyte")
    )


def resolve_source(source: str, info: DataInfo, key: str) -> str:
    """The concrete source `auto` stands for with this data (see the module docstring)."""
    if source not in SOURCES:
        raise BdrunError(f"attack.{key}={source!r} must be one of {', '.join(SOURCES)}")
    if source == "fashion_mnist" and not fashion_mnist_available():
        raise BdrunError(
            f"attack.{key}=fashion_mnist: Fashion-MNIST is not installed (apt-get install "
            "dataset-fashion-mnist); choose another source or point attack.images at a folder"
        )
    if source != "auto":
        return source
    if info.shape[0] != 1:
        return "sample_images"
    if info.name == "digits":
        return "fashion_mnist" if fashion_mnist_available() else "sample_images"
    return "digits"


def offline_images(
    source: str,
    folder: str | None,
    info: DataInfo,
    count: int | None,
    g: torch.Generator,
    key: str = "image_source",
    folder_key: str = "images",
) -> tuple[Tensor, Tensor]:
    """Up to `count` images (all of them when None) of a folder (when given) or an offline source,
    fitted to the data's shape, with their labels; a subset is drawn with g."""
    shape = tuple(info.shape)
    if folder:
        images, labels = folder_images(folder, shape, folder_key)
    else:
        resolved = resolve_source(source, info, key)
        if resolved == "sample_images":
            return sample_image_crops(count or 200, shape, g)
        images, labels = dataset_images(resolved, shape)
    if count is not None and count < len(images):
        chosen = torch.randperm(len(images), generator=g)[:count].sort().values
        images, labels = images[chosen], labels[chosen]
    return images, labels
