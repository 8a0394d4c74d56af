"""A user's torch CNN -> encoder IR + weights: read the layers, never guess.

The device runs the leading conv stack of a features extractor: Conv2d / ReLU / MaxPool2d /
AvgPool2d, up to the first Flatten or Linear. Whatever follows (SB3's NatureCNN `linear`,
a user's fully connected layers) stays on the server, in the head. Anything in the conv
stack the IR cannot express exactly (dilation, groups, BatchNorm, other activations,
rectangular kernels, ceil_mode) is refused with the layer's position, attribute and value.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from torch import nn

from splitedge.errors import SplitedgeError
from splitedge.ir import EncoderIR, Layer


class LayerError(SplitedgeError):
    """A layer of the user's encoder has no exact device (shader) form."""


@dataclass
class ConvStack:
    """The device part of an encoder: IR layers, their weights, and the modules they came from."""

    layers: list[Layer]
    weights: dict[str, np.ndarray]
    modules: list[nn.Module]  # the conv stack, in order (what the device runs)
    rest: list[nn.Module]  # modules after the cut in the same sequence (Flatten excluded)


def _square(value: object, what: str, where: str) -> int:
    if isinstance(value, int):
        return value
    values = tuple(value)  # type: ignore[call-overload]
    if len(set(values)) != 1:
        raise LayerError(f"{where}: {what}={values} is not square; the IR supports square only")
    return int(values[0])


def _conv(mod: nn.Conv2d, where: str, name: str) -> tuple[Layer, dict[str, np.ndarray]]:
    for attr, ok in (
        ("dilation", _square(mod.dilation, "dilation", where) == 1),
        ("groups", mod.groups == 1),
        ("padding_mode", mod.padding_mode == "zeros"),
    ):
        if not ok:
            raise LayerError(
                f"{where}: {attr}={getattr(mod, attr)!r} has no device form (supported: "
                "dilation 1, groups 1, zero padding)"
            )
    if isinstance(mod.padding, str):
        raise LayerError(f"{where}: padding={mod.padding!r}; give padding as a number")
    kernel = _square(mod.kernel_size, "kernel_size", where)
    stride = _square(mod.stride, "stride", where)
    padding = _square(mod.padding, "padding", where)
    try:
        layer = Layer("conv", name, mod.in_channels, mod.out_channels, kernel, stride, padding)
    except ValueError as e:
        raise LayerError(f"{where}: {e}") from e
    w = mod.weight.detach().cpu().numpy().astype(np.float32)
    b = (
        mod.bias.detach().cpu().numpy().astype(np.float32)
        if mod.bias is not None
        else np.zeros(mod.out_channels, np.float32)
    )
    return layer, {f"{name}.weight": w, f"{name}.bias": b}


def _pool(mod: nn.MaxPool2d | nn.AvgPool2d, where: str) -> Layer:
    op = "maxpool" if isinstance(mod, nn.MaxPool2d) else "avgpool"
    if mod.ceil_mode:
        raise LayerError(f"{where}: ceil_mode=True has no device form (use floor mode)")
    if isinstance(mod, nn.MaxPool2d) and _square(mod.dilation, "dilation", where) != 1:
        raise LayerError(f"{where}: dilation={mod.dilation!r} has no device form")
    if isinstance(mod, nn.AvgPool2d):
        if not mod.count_include_pad:
            raise LayerError(f"{where}: count_include_pad=False has no device form")
        if mod.divisor_override is not None:
            raise LayerError(f"{where}: divisor_override={mod.divisor_override} has no device form")
    kernel = _square(mod.kernel_size, "kernel_size", where)
    stride = _square(mod.stride if mod.stride is not None else kernel, "stride", where)
    padding = _square(mod.padding, "padding", where)
    try:
        return Layer(op, kernel=kernel, stride=stride, padding=padding)
    except (TypeError, ValueError) as e:
        raise LayerError(f"{where}: {e}") from e


def flatten_modules(module: nn.Module) -> list[nn.Module]:
    """The leaf modules of nested Sequentials / ModuleLists, in order."""
    if isinstance(module, nn.Sequential | nn.ModuleList):
        return [leaf for child in module for leaf in flatten_modules(child)]
    return [module]


def read_conv_stack(modules: Sequence[nn.Module], owner: str) -> ConvStack:
    """Cut `modules` after the conv stack; refuse a layer in the stack the IR cannot express."""
    layers: list[Layer] = []
    weights: dict[str, np.ndarray] = {}
    n_conv = 0
    for i, mod in enumerate(modules):
        where = f"{owner} layer {i} ({type(mod).__name__})"
        if isinstance(mod, nn.Conv2d):
            layer, w = _conv(mod, where, f"conv{n_conv}")
            n_conv += 1
            layers.append(layer)
            weights.update(w)
        elif isinstance(mod, nn.ReLU):
            layers.append(Layer("relu"))
        elif isinstance(mod, nn.MaxPool2d | nn.AvgPool2d):
            layers.append(_pool(mod, where))
        elif isinstance(mod, nn.Identity | nn.Dropout):
            continue  # no-ops at inference
        elif isinstance(mod, nn.Flatten | nn.Linear):
            if not layers:
                break
            rest = list(modules[i + 1 :]) if isinstance(mod, nn.Flatten) else list(modules[i:])
            if isinstance(mod, nn.Flatten) and (mod.start_dim, mod.end_dim) != (1, -1):
                raise LayerError(
                    f"{where}: start_dim={mod.start_dim}, end_dim={mod.end_dim}; "
                    "the cut needs Flatten(1, -1)"
                )
            return ConvStack(layers, weights, list(modules[:i]), rest)
        else:
            raise LayerError(
                f"{where} has no device (shader) form; the device runs Conv2d, ReLU, "
                "MaxPool2d and AvgPool2d up to the first Flatten or Linear"
            )
    if not any(layer.op == "conv" for layer in layers):
        raise LayerError(
            f"{owner}: no Conv2d before the first Flatten/Linear; nothing to run on the device"
        )
    return ConvStack(layers, weights, list(modules[: len(modules)]), [])


def build_ir(stack: ConvStack, shape: Sequence[int], input_scale: float) -> EncoderIR:
    """The IR of a conv stack on a (C, H, W) input; the output quantisation is set later."""
    c, h, w = (int(d) for d in shape)
    ir = EncoderIR(c, h, w, (*stack.layers, Layer("flatten")), input_scale=input_scale)
    try:
        ir.shapes()
    except ValueError as e:
        raise LayerError(f"encoder on a {c}x{h}x{w} input: {e}") from e
    return ir
