"""Keras 2 HDF5 weights (CSAW-HackML BadNets) into PyTorch models, read as arrays with h5py.

Two layouts are read, as Keras 2.3 writes them:
- weights-only files (`model.save_weights`, CSAW's `*_bd_weights.h5`): one group per layer at the
  top level, e.g. `conv_1/conv_1/kernel:0`, listed in the `layer_names` attribute;
- full-model files (`model.save`, CSAW's `*_bd_net.h5`): the same groups under `model_weights/`,
  plus a JSON `model_config` attribute that gives the input shape.

Layout conversions: Conv2D kernels are (kh, kw, in, out) and become (out, in, kh, kw); Dense kernels
are (in, out) and become (out, in). A Dense layer that reads a Flatten of an NHWC feature map sees
its inputs in (h, w, c) order, while PyTorch flattens NCHW maps in (c, h, w) order, so its input
columns are permuted; the model names those layers in `keras_flatten_inputs`.
No TensorFlow is needed and nothing is unpickled.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn

from bdrun.errors import BdrunError
from bdrun.finite import check_weights

KerasLayers = dict[str, dict[str, np.ndarray]]
WEIGHT_KINDS = ("kernel", "bias")


def _open(path: str | Path):
    import h5py

    path = Path(path).expanduser()
    if not path.is_file():
        raise BdrunError(f"Keras weights file not found: {path}")
    try:
        return h5py.File(path, "r")
    except OSError as err:
        raise BdrunError(f"{path} is not a readable HDF5 file ({err})") from None


def _text(value: object) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def read_keras_layers(path: str | Path) -> KerasLayers:
    """{layer name: {"kernel": array, "bias": array}} for every layer with weights in the file."""
    import h5py

    path = Path(path).expanduser()
    with _open(path) as f:
        root = f.get("model_weights", f)
        listed = "layer_names" in root.attrs
        names = [_text(n) for n in root.attrs["layer_names"]] if listed else list(root.keys())
        layers: KerasLayers = {}
        for name in names:
            group = root.get(name)
            if not isinstance(group, h5py.Group):
                if not listed:
                    continue  # a data array, not a layer
                raise BdrunError(f"{path}: layer {name!r} is listed but has no weight group")
            if "weight_names" in group.attrs:
                datasets = {_text(w): group[_text(w)] for w in group.attrs["weight_names"]}
            else:  # files written without the attribute: every array under the layer's group
                datasets = {}
                group.visititems(
                    lambda key, obj, out=datasets: (
                        out.update({key: obj}) if isinstance(obj, h5py.Dataset) else None
                    )
                )
            weights = {}
            for weight_name, dataset in datasets.items():
                kind = weight_name.rsplit("/", 1)[-1].split(":")[0]
                if kind not in WEIGHT_KINDS:
                    raise BdrunError(
                        f"{path}: layer {name!r} has weight {weight_name!r}; only Conv2D and Dense "
                        "layers (kernel, bias) can be imported"
                    )
                weights[kind] = np.asarray(dataset, dtype=np.float32)
            if weights:
                layers[name] = weights
    if not layers:
        raise BdrunError(f"{path} holds no Keras layer weights (no kernel:0 / bias:0 arrays)")
    arrays = {f"{name}/{kind}": array for name, ws in layers.items() for kind, array in ws.items()}
    check_weights(arrays, str(path))
    return layers


def keras_input_shape(path: str | Path) -> tuple[int, int, int] | None:
    """(C, H, W) from a full-model file's `model_config`, or None (weights-only files)."""
    with _open(path) as f:
        raw = f.attrs.get("model_config")
    if raw is None:
        return None
    try:
        layers = json.loads(_text(raw))["config"]["layers"]
        shape = layers[0]["config"]["batch_input_shape"][1:]
    except (KeyError, IndexError, TypeError, ValueError):
        return None
    if len(shape) != 3 or not all(isinstance(s, int) for s in shape):
        return None
    height, width, channels = shape
    return channels, height, width


def nhwc_dense_to_nchw(kernel: np.ndarray, chw: Sequence[int]) -> np.ndarray:
    """A Dense kernel (h*w*c, out) reading an NHWC flatten, as a torch weight (out, c*h*w)."""
    channels, height, width = chw
    out = kernel.shape[1]
    return kernel.reshape(height, width, channels, out).transpose(2, 0, 1, 3).reshape(-1, out).T


def _flatten_shapes(model: nn.Module, sources: Mapping[str, str]) -> dict[str, tuple[int, ...]]:
    """(C, H, W) of the output of each module named in `sources`, from one blank forward pass."""
    modules = dict(model.named_modules())
    shapes: dict[str, tuple[int, ...]] = {}

    def record(dense: str):
        def hook(_module: nn.Module, _inputs: object, out: Tensor) -> None:
            shapes[dense] = tuple(out.shape[1:])

        return hook

    handles = [modules[source].register_forward_hook(record(d)) for d, source in sources.items()]
    was_training = model.training
    try:
        with torch.no_grad():
            model.eval()(torch.zeros(1, *model.in_shape))
    finally:
        model.train(was_training)
        for handle in handles:
            handle.remove()
    return shapes


def _converted(
    name: str, module: nn.Module, weights: dict[str, np.ndarray], flat_chw: tuple[int, ...] | None
) -> dict[str, Tensor]:
    """The torch parameters of one layer from its Keras arrays, shapes checked."""
    kernel = weights.get("kernel")
    if kernel is None:
        raise BdrunError(f"Keras layer {name!r} has no kernel")
    if isinstance(module, nn.Conv2d):
        kh, kw = module.kernel_size
        expected = (kh, kw, module.in_channels // module.groups, module.out_channels)
        what = "(kh, kw, in, out)"
        weight = kernel.transpose(3, 2, 0, 1) if kernel.shape == expected else None
    else:
        expected = (module.in_features, module.out_features)
        what = "(in, out)"
        weight = None
        if kernel.shape == expected:
            weight = nhwc_dense_to_nchw(kernel, flat_chw) if flat_chw else kernel.T
    if weight is None:
        raise BdrunError(
            f"Keras layer {name!r}: kernel shape {kernel.shape} but the model needs {expected} "
            f"{what}; the weights are for another architecture or input size"
        )
    params = {"weight": torch.from_numpy(np.ascontiguousarray(weight))}
    bias = weights.get("bias")
    if (bias is None) != (module.bias is None):
        has = "has no" if bias is None else "has a"
        raise BdrunError(f"Keras layer {name!r} {has} bias but the model's layer does not agree")
    if bias is not None:
        if bias.shape != tuple(module.bias.shape):
            raise BdrunError(
                f"Keras layer {name!r}: bias shape {bias.shape} but the model needs "
                f"{tuple(module.bias.shape)}"
            )
        params["bias"] = torch.from_numpy(bias)
    return params


def load_keras_weights(
    model: nn.Module, path: str | Path, layers: KerasLayers | None = None
) -> nn.Module:
    """Copy a Keras HDF5 file's weights into `model` (in place) and return it.

    Every Conv2d / Linear module of the model must have a Keras layer of the same name and
    shape and vice versa; otherwise a BdrunError names the layer and nothing is changed.
    `model.keras_flatten_inputs` ({dense layer: module whose output it flattens}) marks the
    Dense layers whose inputs are permuted from NHWC to NCHW order. `layers` passes arrays
    already read with `read_keras_layers(path)`.
    """
    layers = layers if layers is not None else read_keras_layers(path)
    targets = {
        name: module
        for name, module in model.named_modules()
        if isinstance(module, nn.Conv2d | nn.Linear)
    }
    missing = [name for name in targets if name not in layers]
    extra = [name for name in layers if name not in targets]
    if missing or extra:
        problem = (
            f"has no layer {missing[0]!r} that the model needs"
            if missing
            else f"has layer {extra[0]!r} that the model lacks"
        )
        raise BdrunError(
            f"{path} {problem} (file layers: {', '.join(layers)}; model layers: "
            f"{', '.join(targets)}); use the matching model (e.g. model=deepid)"
        )
    flatten_inputs = dict(getattr(model, "keras_flatten_inputs", {}))
    flat_shapes = _flatten_shapes(model, flatten_inputs) if flatten_inputs else {}
    converted = {
        name: _converted(name, module, layers[name], flat_shapes.get(name))
        for name, module in targets.items()
    }
    with torch.no_grad():  # only after every layer converted: all or nothing
        for name, params in converted.items():
            for key, value in params.items():
                getattr(targets[name], key).copy_(value)
    return model


def from_keras_h5(
    path: str | Path,
    in_shape: Sequence[int] | None = None,
    input_scale: float = 1.0,
) -> nn.Module:
    """The CSAW-HackML DeepID BadNet in a Keras .h5 file as a PyTorch module in eval mode.

    It takes NCHW float images and returns pre-softmax logits (the Keras model ends in a softmax;
    argmax is the same). `in_shape` (C, H, W) defaults to the file's model config, else
    (C, 55, 47) (YouTube Aligned Faces). `input_scale` multiplies the inputs first: 1 for images
    in [0, 1] (the competition's eval.py divides by 255), 255 to feed [0, 1] images to a model
    trained on raw 0..255 pixels (lab3's eval.py does not divide).
    """
    from bdrun.models.deepid import DeepID

    layers = read_keras_layers(path)
    for name in ("conv_1", "output"):
        if name not in layers:
            raise BdrunError(f"{path} has no layer {name!r}: it is not a CSAW DeepID model")
    channels = layers["conv_1"]["kernel"].shape[2]
    num_classes = layers["output"]["kernel"].shape[1]
    shape = tuple(in_shape) if in_shape is not None else keras_input_shape(path)
    shape = shape or (channels, 55, 47)
    model = DeepID(in_shape=shape, num_classes=num_classes, input_scale=input_scale)
    return load_keras_weights(model, path, layers).eval()
