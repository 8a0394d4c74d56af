"""Encoder layer IR: the device encoder as a list of layers, independent of torch.

The IR is what crosses from training (models/) to the device (edge/): the
shader compiler, the reference interpreter and the exporters all read it.
JSON form::

    {"input": {"channels": 3, "height": 48, "width": 48, "scale": 0.00392156862745098},
     "layers": [{"op": "conv", "name": "c0", "in_channels": 3, "out_channels": 8,
                 "kernel": 5, "stride": 2, "padding": 0},
                {"op": "relu"}, {"op": "maxpool", "kernel": 2}, {"op": "flatten"}],
     "output": {"dtype": "uint8", "scale": 0.0235, "zero_point": 0}}

Weights live beside it in an .npz: ``<name>.weight`` (O, I, k, k) and ``<name>.bias`` (O,).
The input is uint8, multiplied by ``input.scale`` (1/255, what SB3 does) before layer 0.
The output is quantised: q = clip(round(x / scale) + zero_point, 0, 255).
"""

from __future__ import annotations

import hashlib
import io
import json
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

OPS = ("conv", "relu", "maxpool", "avgpool", "flatten")


@dataclass(frozen=True)
class Layer:
    """One IR layer; fields unused by an op keep their defaults."""

    op: str
    name: str = ""
    in_channels: int = 0
    out_channels: int = 0
    kernel: int = 1
    stride: int = 1
    padding: int = 0

    def __post_init__(self) -> None:
        if self.op not in OPS:
            raise ValueError(f"unknown IR op {self.op!r}; supported: {', '.join(OPS)}")
        if self.op == "conv":
            if not self.name:
                raise ValueError("conv layer needs a name (its weights are <name>.weight/.bias)")
            if not (1 <= self.kernel <= 5 and 1 <= self.stride <= 3 and 0 <= self.padding <= 2):
                raise ValueError(
                    f"conv {self.name}: kernel {self.kernel}, stride {self.stride}, padding "
                    f"{self.padding} outside kernel 1..5, stride 1..3, padding 0..2"
                )
        if self.op in ("maxpool", "avgpool") and not 1 <= self.kernel <= 4:
            raise ValueError(f"{self.op}: kernel {self.kernel} outside 1..4")


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
                h = (h + 2 * layer.padding - layer.kernel) // layer.stride + 1
                w = (w + 2 * layer.padding - layer.kernel) // layer.stride + 1
                c = layer.out_channels
            elif layer.op in ("maxpool", "avgpool"):
                h, w = h // layer.kernel, w // layer.kernel
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
        layers = []
        for layer in self.layers:
            d = {
                k: v for k, v in asdict(layer).items() if v != getattr(Layer, k, None) or k == "op"
            }
            layers.append(d)
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
            layers=tuple(Layer(**layer) for layer in doc["layers"]),
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
