"""Reference interpreter of the encoder IR in numpy: the living definition every backend is tested against.

It also defines the *stages* the GL compiler works in: each conv or pool layer together
with the ReLU(s) directly after it. On 8-bit targets (es2) every stage output except the
last is stored as uint8 with its own scale and zero point; `forward(..., act_quant=...)`
emulates exactly that storage, so it is the definition of what es2 computes.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from splitedge.ir import EncoderIR, Layer

PRODUCERS = ("conv", "maxpool", "avgpool")


@dataclass(frozen=True)
class Stage:
    """One conv/pool layer plus the ReLU fused after it."""

    index: int  # position of the conv/pool layer in ir.layers
    layer: Layer
    relu: bool
    in_shape: tuple[int, int, int]  # (C, H, W)
    out_shape: tuple[int, int, int]

    @property
    def label(self) -> str:
        """How messages name this stage: the conv's name, or op@index for pools."""
        return self.layer.name or f"{self.layer.op}@{self.index}"


@dataclass(frozen=True)
class ActQuant:
    """8-bit storage of one stage's output: x = (q - zero_point) * scale, q in 0..255."""

    layer: int  # index of the stage's conv/pool layer in ir.layers
    scale: float
    zero_point: int = 0


def stages(ir: EncoderIR) -> list[Stage]:
    """The IR as conv/pool stages with fused ReLUs; raises ValueError on what the compiler cannot run."""
    shapes = ir.shapes()
    out: list[Stage] = []
    prev = (ir.channels, ir.height, ir.width)
    for i, layer in enumerate(ir.layers):
        if layer.op in PRODUCERS:
            out.append(Stage(i, layer, False, prev, shapes[i]))
        elif layer.op == "relu" and out:
            out[-1] = Stage(out[-1].index, out[-1].layer, True, out[-1].in_shape, out[-1].out_shape)
        elif layer.op == "flatten" and i != len(ir.layers) - 1:
            raise ValueError(
                f"flatten must be the last layer, found at layer {i} of {len(ir.layers)}"
            )
        # a ReLU before any conv/pool acts on the non-negative scaled input: the identity
        prev = shapes[i]
    if not out:
        raise ValueError("encoder has no conv or pool layer; nothing to compile")
    if ir.input_scale < 0:
        raise ValueError(f"input scale {ir.input_scale} must be >= 0")
    return out


def conv2d(x: np.ndarray, w: np.ndarray, b: np.ndarray, stride: int, padding: int) -> np.ndarray:
    """torch.nn.functional.conv2d semantics on (B, C, H, W) float64."""
    if padding:
        x = np.pad(x, ((0, 0), (0, 0), (padding, padding), (padding, padding)))
    k = w.shape[-1]
    win = np.lib.stride_tricks.sliding_window_view(x, (k, k), axis=(2, 3))  # (B, C, H', W', k, k)
    win = win[:, :, ::stride, ::stride]
    return np.einsum("bchwij,ocij->bohw", win, w, optimize=True) + b[None, :, None, None]


def pool2d(x: np.ndarray, kernel: int, stride: int, padding: int, kind: str) -> np.ndarray:
    """torch's MaxPool2d / AvgPool2d (count_include_pad=True, floor mode) on (B, C, H, W)."""
    if padding:  # max ignores the border (-inf); the average counts it as zeros
        fill = -np.inf if kind == "maxpool" else 0.0
        pad = ((0, 0), (0, 0), (padding, padding), (padding, padding))
        x = np.pad(x, pad, constant_values=fill)
    win = np.lib.stride_tricks.sliding_window_view(x, (kernel, kernel), axis=(2, 3))
    win = win[:, :, ::stride, ::stride]  # (B, C, H', W', k, k)
    return win.max(axis=(4, 5)) if kind == "maxpool" else win.mean(axis=(4, 5))


def fake_quant(x: np.ndarray, scale: float, zero_point: int) -> np.ndarray:
    """What 8-bit storage keeps of x: round to the grid, clamp to 0..255, decode."""
    q = np.clip(np.round(x / scale) + zero_point, 0, 255)
    return (q - zero_point) * scale


def run_stage(stage: Stage, x: np.ndarray, weights: dict[str, np.ndarray]) -> np.ndarray:
    """One stage on float64 (B, C, H, W)."""
    layer = stage.layer
    if layer.op == "conv":
        w = weights[f"{layer.name}.weight"].astype(np.float64)
        b = weights[f"{layer.name}.bias"].astype(np.float64)
        x = conv2d(x, w, b, layer.stride, layer.padding)
    else:
        x = pool2d(x, layer.kernel, layer.stride, layer.padding, layer.op)
    return np.maximum(x, 0.0) if stage.relu else x


def forward_stages(
    ir: EncoderIR,
    weights: dict[str, np.ndarray],
    observations: np.ndarray,
    act_quant: Sequence[ActQuant] | None = None,
) -> list[np.ndarray]:
    """Every stage's output (B, C, H, W) float64 for uint8 observations (B, C, H, W)."""
    quant = {q.layer: q for q in act_quant or ()}
    all_stages = stages(ir)
    x = observations.astype(np.float64) * ir.input_scale
    outs = []
    for n, stage in enumerate(all_stages):
        x = run_stage(stage, x, weights)
        if (
            stage.index in quant and n < len(all_stages) - 1
        ):  # the last stage uses the output quantisation
            x = fake_quant(x, quant[stage.index].scale, quant[stage.index].zero_point)
        outs.append(x)
    return outs


def forward(
    ir: EncoderIR,
    weights: dict[str, np.ndarray],
    observations: np.ndarray,
    act_quant: Sequence[ActQuant] | None = None,
) -> np.ndarray:
    """Features before output quantisation, (B, F) float32, flattened in (C, H, W) order."""
    out = forward_stages(ir, weights, observations, act_quant)[-1]
    return out.reshape(out.shape[0], -1).astype(np.float32)


def quantise_output(ir: EncoderIR, features: np.ndarray) -> np.ndarray:
    """uint8 features exactly as encoder.onnx makes them: clip(round(x / scale) + zp, 0, 255)."""
    x = np.asarray(features, dtype=np.float32) / np.float32(ir.output_scale)
    return np.clip(np.round(x) + ir.output_zero_point, 0, 255).astype(np.uint8)


def encode(
    ir: EncoderIR,
    weights: dict[str, np.ndarray],
    observations: np.ndarray,
    act_quant: Sequence[ActQuant] | None = None,
) -> np.ndarray:
    """uint8 (B, C, H, W) -> uint8 (B, F): the reference encoder."""
    return quantise_output(ir, forward(ir, weights, observations, act_quant))
