"""Encoder layer IR: the device encoder as a list of layers, independent of torch.

The IR is what crosses from training (models/) to the device (edge/): the
shader compiler, the reference interpreter and the exporters all read it.
JSON form::

    {"input": {"channels": 3, "height": 48, "width": 48, "scale": 0.00392156862745098},
     "layers": [{"op": "conv", "name": "c0", "in_channels": 3, "out_channels": 8,
                 "kernel": 5, "stride": 2, "padding": 0},
                {"op": "relu"}, {"op": "maxpool", "kernel": 3, "stride": 2, "padding": 1},
                {"op": "flatten"}],
     "output": {"dtype": "uint8", "scale": 0.0235, "zero_point": 0}}

Ranges (every backend runs all of them exactly): conv kernel 1..8, stride 1..4, padding 0..3;
maxpool/avgpool kernel 1..8, stride 1..8 (absent: = kernel), padding 0..kernel // 2.
Weights live beside it in an .npz: ``<name>.weight`` (O, I, k, k) and ``<name>.bias`` (O,).
The input is uint8, multiplied by ``input.scale`` (1/255, what SB3 does) before layer 0.
The output is quantised: q = clip(round(x / scale) + zero_point, 0, 255).
"""

from __future__ import annotations

import hashlib
import io
import json
from dataclasses import asdict, dataclass, field, fields
from typing import Any

import numpy as np

OPS = ("conv", "relu", "maxpool", "avgpool", "flatten")
POOLS = ("maxpool", "avgpool")
# What every backend (numpy reference, GL shaders, torch, ONNX) runs exactly.
CONV_KERNEL, CONV_STRIDE, CONV_PADDING = (1, 8), (1, 4), (0, 3)
POOL_KERNEL, POOL_STRIDE = (1, 8), (1, 8)  # pool padding: 0..kernel // 2, torch's rule


def _check_int(
    what: str, attr: str, value: Any, lo: int, hi: int | None = None, why: str = ""
) -> None:
    """ValueError naming the attribute and its value unless lo <= value <= hi (an int)."""
    span = f"{lo}..{hi}" if hi is not None else f">= {lo}"
    if not isinstance(value, int) or isinstance(value, bool):
        raise ValueError(f"{what}: {attr} {value!r} is not an integer ({span})")
    if value < lo or (hi is not None and value > hi):
        raise ValueError(f"{what}: {attr} {value} outside {span}{why}")


@dataclass(frozen=True, init=False)
class Layer:
    """One IR layer; fields unused by an op keep their defaults.

    conv: ``kernel`` x ``kernel``, ``stride``, zero ``padding`` (torch.nn.Conv2d).
    maxpool / avgpool: ``kernel``, ``stride`` (default: ``kernel``, as torch), ``padding``
    (maxpool pads with -inf; avgpool counts padded zeros in the divisor, torch's
    count_include_pad=True); floor mode. A pool layer written without ``stride`` (every
    bundle from before strided pools) means stride = kernel.
    """

    op: str
    name: str
    in_channels: int
    out_channels: int
    kernel: int
    stride: int
    padding: int

    def __init__(
        self,
        op: str,
        name: str = "",
        in_channels: int = 0,
        out_channels: int = 0,
        kernel: int = 1,
        stride: int | None = None,
        padding: int = 0,
    ) -> None:
        if stride is None:
            stride = kernel if op in POOLS else 1
        for attr, value in (
            ("op", op),
            ("name", name),
            ("in_channels", in_channels),
            ("out_channels", out_channels),
            ("kernel", kernel),
            ("stride", stride),
            ("padding", padding),
        ):
            object.__setattr__(self, attr, value)
        self._validate()

    def _validate(self) -> None:
        if self.op not in OPS:
            raise ValueError(f"unknown IR op {self.op!r}; supported: {', '.join(OPS)}")
        if self.op == "conv":
            if not self.name:
                raise ValueError("conv layer needs a name (its weights are <name>.weight/.bias)")
            what = f"conv {self.name}"
            _check_int(what, "in_channels", self.in_channels, 1)
            _check_int(what, "out_channels", self.out_channels, 1)
            _check_int(what, "kernel", self.kernel, *CONV_KERNEL)
            _check_int(what, "stride", self.stride, *CONV_STRIDE)
            _check_int(what, "padding", self.padding, *CONV_PADDING)
        elif self.op in POOLS:
            _check_int(self.op, "kernel", self.kernel, *POOL_KERNEL)
            _check_int(self.op, "stride", self.stride, *POOL_STRIDE)
            _check_int(
                self.op, "padding", self.padding, 0, self.kernel // 2, " (at most kernel // 2)"
            )

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Layer:
        """A layer from its JSON form; unknown attributes are refused, not ignored."""
        unknown = sorted(set(d) - {f.name for f in fields(cls)})
        if unknown:
            raise ValueError(
                f"{d.get('op', '?')}: unknown attribute {unknown[0]!r} = {d[unknown[0]]!r}"
            )
        if "op" not in d:
            raise ValueError(f"IR layer without an op: {d!r}")
        return cls(**d)

    def to_dict(self) -> dict[str, Any]:
        """JSON form: op plus every field that differs from its default (pool stride: kernel)."""
        defaults = {
            "name": "",
            "in_channels": 0,
            "out_channels": 0,
            "kernel": 1,
            "stride": self.kernel if self.op in POOLS else 1,
            "padding": 0,
        }
        return {k: v for k, v in asdict(self).items() if k == "op" or v != defaults[k]}

    def output_size(self, size: int) -> int:
        """Output height (or width) of a conv or pool for an input of `size` (floor mode)."""
        return (size + 2 * self.padding - self.kernel) // self.stride + 1


@dataclass(frozen=True)
class EncoderIR:
    """Input spec, layers and output quantisation of a device encoder."""

    channels: int
    height: int
    width: int
    layers: tuple[Layer, ...]
    input_scale: float = 1.0 / 255.0
    output_scale: float = 1.0
    output_zero_point: int = 0
    output_dtype: str = "uint8"
    extra: dict[str, Any] = field(default_factory=dict)

    def shapes(self) -> list[tuple[int, int, int]]:
        """(C, H, W) after each layer (flatten keeps the 3-D shape); raises on a bad chain."""
        c, h, w = self.channels, self.height, self.width
        out = []
        for i, layer in enumerate(self.layers):
            if layer.op == "conv":
                if layer.in_channels != c:
                    raise ValueError(
                        f"layer {i} ({layer.name}): in_channels {layer.in_channels} but input has {c}"
                    )
                c = layer.out_channels
            if layer.op == "conv" or layer.op in POOLS:
                h, w = layer.output_size(h), layer.output_size(w)
            if h < 1 or w < 1:
                raise ValueError(f"layer {i} ({layer.op}) shrinks the image to {h}x{w}")
            out.append((c, h, w))
        return out

    @property
    def output_shape(self) -> tuple[int, int, int]:
        return self.shapes()[-1] if self.layers else (self.channels, self.height, self.width)

    @property
    def feature_count(self) -> int:
        c, h, w = self.output_shape
        return c * h * w

    def to_json(self) -> str:
        layers = [layer.to_dict() for layer in self.layers]
        doc = {
            "input": {
                "channels": self.channels,
                "height": self.height,
                "width": self.width,
                "scale": self.input_scale,
            },
            "layers": layers,
            "output": {
                "dtype": self.output_dtype,
                "scale": self.output_scale,
                "zero_point": self.output_zero_point,
                "features": self.feature_count,
            },
        }
        if self.extra:
            doc["extra"] = self.extra
        return json.dumps(doc, indent=1)

    @classmethod
    def from_json(cls, text: str) -> EncoderIR:
        doc = json.loads(text)
        inp, outp = doc["input"], doc.get("output", {})
        ir = cls(
            channels=int(inp["channels"]),
            height=int(inp["height"]),
            width=int(inp["width"]),
            input_scale=float(inp.get("scale", 1.0 / 255.0)),
            layers=tuple(Layer.from_dict(layer) for layer in doc["layers"]),
            output_scale=float(outp.get("scale", 1.0)),
            output_zero_point=int(outp.get("zero_point", 0)),
            output_dtype=str(outp.get("dtype", "uint8")),
            extra=dict(doc.get("extra", {})),
        )
        ir.shapes()  # validate the chain
        return ir


def check_weights(ir: EncoderIR, weights: dict[str, np.ndarray]) -> None:
    """Raise ValueError naming the layer if a weight is missing or has the wrong shape."""
    for layer in ir.layers:
        if layer.op != "conv":
            continue
        want_w = (layer.out_channels, layer.in_channels, layer.kernel, layer.kernel)
        for key, want in (
            (f"{layer.name}.weight", want_w),
            (f"{layer.name}.bias", (layer.out_channels,)),
        ):
            if key not in weights:
                raise ValueError(f"conv {layer.name}: weight {key!r} missing")
            if tuple(weights[key].shape) != want:
                raise ValueError(
                    f"conv {layer.name}: {key} has shape {weights[key].shape}, expected {want}"
                )


def digest(ir: EncoderIR, weights: dict[str, np.ndarray]) -> str:
    """sha256 over the IR JSON and the float32 weights in name order: identifies an encoder."""
    h = hashlib.sha256(ir.to_json().encode())
    for key in sorted(weights):
        h.update(key.encode())
        h.update(np.ascontiguousarray(weights[key], dtype=np.float32).tobytes())
    return h.hexdigest()


def save_weights(weights: dict[str, np.ndarray]) -> bytes:
    """npz bytes of float32 weights (no pickle)."""
    buf = io.BytesIO()
    arrays: dict[str, Any] = {k: np.asarray(v, dtype=np.float32) for k, v in weights.items()}
    np.savez(buf, **arrays)
    return buf.getvalue()


def load_weights(path: Any) -> dict[str, np.ndarray]:
    """Weights from an npz file, refusing pickled objects."""
    with np.load(path, allow_pickle=False) as z:
        return {k: z[k] for k in z.files}
