"""IR -> pass plan: every fix-up the GL targets need, done before any shader text exists.

Layout: each activation is one RGBA texture, an *atlas* whose 4-channel groups sit side
by side (group g covers x in [g*W, (g+1)*W)) and whose batch items are stacked (item b
covers y in [b*H, (b+1)*H)). Channels are padded to a multiple of 4 with zeros.
Passes: one per group of 4 output channels. A conv pass sums 4x4 weight blocks times the
input texels it samples (one *tap* = one input group at one kernel offset); when the taps
do not fit a device's per-pass limits they are split into chunks that carry a float
partial sum, which 8-bit storage cannot hold, so there the plan is refused instead.
Refusals are PlanError with one line naming the layer, the limit and the number.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field, replace

import numpy as np

from edge.encoder.reference import ActQuant, Stage, stages
from splitedge.errors import SplitedgeError
from splitedge.ir import EncoderIR

FIXED_UNIFORM_VECTORS = 6  # bias, decode, encode, two texel sizes, one spare
TAP_UNIFORM_VECTORS = 4  # one mat4 of weights per tap


class PlanError(SplitedgeError):
    """The encoder does not fit the target's limits."""


@dataclass(frozen=True)
class Limits:
    """What one pass may use on a device; None means no limit."""

    max_texture_units: int | None = None
    max_samples_per_pass: int | None = None
    max_uniform_vectors: int | None = None
    max_texture_size: int | None = None
    float_storage: bool = True  # can render to float textures
    source: str = "the GL context"  # named in refusals, e.g. "device profile pi-4b"

    def merge(self, other: Limits | None) -> Limits:
        """The stricter of two limit sets (a device profile on top of what the context reports)."""
        if other is None:
            return self

        def lower(a: int | None, b: int | None) -> int | None:
            return b if a is None else a if b is None else min(a, b)

        return Limits(
            lower(self.max_texture_units, other.max_texture_units),
            lower(self.max_samples_per_pass, other.max_samples_per_pass),
            lower(self.max_uniform_vectors, other.max_uniform_vectors),
            lower(self.max_texture_size, other.max_texture_size),
            self.float_storage and other.float_storage,
            other.source if other.source != "the GL context" else self.source,
        )


@dataclass(frozen=True)
class Buffer:
    """One activation texture: shape, and how its texels decode to values."""

    channels: int
    height: int
    width: int
    storage: str  # "frame" (uint8 input), "u8" (quantised activation) or "float"
    scale: float = 1.0  # frame/u8: x = (q - zero_point) * scale
    zero_point: int = 0

    @property
    def groups(self) -> int:
        return (self.channels + 3) // 4

    @property
    def atlas_width(self) -> int:
        return self.groups * self.width

    def decode(self) -> tuple[float, float]:
        """(a, c) with x = a * sampled + c; a sampled RGBA8 texel is q / 255."""
        if self.storage == "float":
            return 1.0, 0.0
        return 255.0 * self.scale, -self.zero_point * self.scale

    def encode(self) -> tuple[float, float]:
        """(a, c) with q = round(a * x + c) for u8 storage."""
        return (1.0 / self.scale, float(self.zero_point)) if self.storage == "u8" else (1.0, 0.0)


@dataclass
class Pass:
    """One draw: writes output group `group` of buffer `dst` from buffer `src`."""

    op: str  # conv, maxpool, avgpool
    label: str
    src: int
    dst: int
    group: int
    taps: tuple[tuple[int, int, int], ...]  # (input group, ky, kx)
    kernel: int
    stride: int
    padding: int
    relu: bool = False
    partial: int | None = None  # buffer holding the running sum this chunk adds to
    finish: bool = True  # last chunk: add bias, ReLU, encode for storage
    weights: np.ndarray | None = field(default=None, repr=False)  # (T, 4 in, 4 out) float32
    bias: np.ndarray | None = field(default=None, repr=False)  # (4,) float32

    @property
    def samples(self) -> int:
        return len(self.taps) + (self.partial is not None)

    @property
    def texture_units(self) -> int:
        return 1 + (self.partial is not None)

    @property
    def uniform_vectors(self) -> int:
        return FIXED_UNIFORM_VECTORS + (
            TAP_UNIFORM_VECTORS * len(self.taps) if self.op == "conv" else 0
        )


@dataclass
class Plan:
    """Buffers and passes in execution order; buffers[0] is the uploaded frame, buffers[output] is read back."""

    buffers: list[Buffer]
    passes: list[Pass]
    output: int
    limits: Limits
    stage_buffers: list[int] = field(default_factory=list)  # each stage's output buffer, in order

    def max_batch(self) -> int:
        """Largest batch whose atlases fit the texture-size limit."""
        tallest = max(b.height for b in self.buffers)
        return max(1, (self.limits.max_texture_size or 1 << 30) // tallest)


def build_plan(
    ir: EncoderIR,
    weights: dict[str, np.ndarray],
    limits: Limits,
    act_quant: Sequence[ActQuant] | None = None,
    target: str = "gl",
) -> Plan:
    """Pass plan for an encoder on a target; raises PlanError naming layer, limit and number."""
    all_stages = stages(ir)
    quant = {q.layer: q for q in act_quant or ()}
    buffers = [Buffer(ir.channels, ir.height, ir.width, "frame", ir.input_scale)]
    passes: list[Pass] = []
    _check_texture_size("input", buffers[0], limits, target)
    src = 0
    stage_buffers: list[int] = []
    for n, stage in enumerate(all_stages):
        c, h, w = stage.out_shape
        if n == len(all_stages) - 1 and not limits.float_storage:
            out = Buffer(
                c, h, w, "u8", ir.output_scale, ir.output_zero_point
            )  # exactly encoder.onnx's grid
        elif limits.float_storage:
            out = Buffer(c, h, w, "float")
        elif stage.index in quant:
            out = Buffer(c, h, w, "u8", quant[stage.index].scale, quant[stage.index].zero_point)
        else:
            raise PlanError(
                f"{target}: stage {stage.label} has no 8-bit activation scale; "
                "calibrate one (edge.encoder.calibrate) or record it in the bundle"
            )
        _check_texture_size(stage.label, out, limits, target)
        buffers.append(out)
        dst = len(buffers) - 1
        if stage.layer.op == "conv":
            passes += _conv_passes(stage, weights, src, dst, buffers, limits, target)
        else:
            passes += _pool_passes(stage, src, dst, buffers[src].groups, limits, target)
        src = dst
        stage_buffers.append(dst)
    for p in passes:
        _check_pass(p, limits, target)
    return Plan(buffers, passes, src, limits, stage_buffers)


def _check_texture_size(label: str, out: Buffer, limits: Limits, target: str) -> None:
    size = limits.max_texture_size
    if size is not None and max(out.atlas_width, out.height) > size:
        raise PlanError(
            f"{target}: layer {label} needs a {out.atlas_width}x{out.height} texture "
            f"({out.groups} groups of 4 channels x {out.width} wide), but {limits.source} allows "
            f"max_texture_size={size}"
        )


def _check_pass(p: Pass, limits: Limits, target: str) -> None:
    for what, used, limit in (
        ("max_samples_per_pass", p.samples, limits.max_samples_per_pass),
        ("max_texture_units", p.texture_units, limits.max_texture_units),
        ("max_uniform_vectors", p.uniform_vectors, limits.max_uniform_vectors),
    ):
        if limit is not None and used > limit:
            raise PlanError(
                f"{target}: layer {p.label} needs {used} ({what}) in one pass, "
                f"but {limits.source} allows {limit}"
            )


def _taps_per_pass(limits: Limits) -> int | None:
    """Most conv taps one pass can take, or None for no limit."""
    caps = []
    if limits.max_samples_per_pass is not None:
        caps.append(limits.max_samples_per_pass)
    if limits.max_uniform_vectors is not None:
        caps.append((limits.max_uniform_vectors - FIXED_UNIFORM_VECTORS) // TAP_UNIFORM_VECTORS)
    return min(caps) if caps else None


def _conv_passes(
    stage: Stage,
    weights: dict[str, np.ndarray],
    src: int,
    dst: int,
    buffers: list[Buffer],
    limits: Limits,
    target: str,
) -> list[Pass]:
    layer = stage.layer
    gin, gout = buffers[src].groups, buffers[dst].groups
    k = layer.kernel
    w = np.zeros((gout * 4, gin * 4, k, k), np.float32)
    w[: layer.out_channels, : layer.in_channels] = weights[f"{layer.name}.weight"]
    b = np.zeros(gout * 4, np.float32)
    b[: layer.out_channels] = weights[f"{layer.name}.bias"]
    taps = tuple((g, ky, kx) for g in range(gin) for ky in range(k) for kx in range(k))
    cap = _taps_per_pass(limits)
    chunks = [taps]
    if cap is not None and len(taps) > cap:
        if not limits.float_storage:
            raise PlanError(
                f"{target}: layer {layer.name} needs {len(taps)} texture samples in one pass "
                f"({gin} groups x {k}x{k}), but {limits.source} allows {cap} and 8-bit storage "
                "cannot carry partial sums between passes"
            )
        step = cap - 1  # each later chunk also samples the running sum
        if step < 1:
            raise PlanError(
                f"{target}: layer {layer.name} cannot be split: {limits.source} allows {cap} taps per pass"
            )
        chunks = [taps[i : i + step] for i in range(0, len(taps), step)]
    scratch: list[int] = []
    if len(chunks) > 1:  # two float ping-pong buffers carry partial sums
        scratch = [len(buffers), len(buffers) + 1]
        buffers += [replace(buffers[dst], storage="float", scale=1.0, zero_point=0)] * 2
    passes = []
    for og in range(gout):
        for j, chunk in enumerate(chunks):
            last = j == len(chunks) - 1
            # (T, in, out): each tap's block transposed, as glUniformMatrix4fv reads columns
            wt = np.stack(
                [w[og * 4 : og * 4 + 4, g * 4 : g * 4 + 4, ky, kx].T for g, ky, kx in chunk]
            )
            passes.append(
                Pass(
                    "conv",
                    layer.name,
                    src,
                    dst if last else scratch[j % 2],
                    og,
                    chunk,
                    k,
                    layer.stride,
                    layer.padding,
                    stage.relu,
                    None if j == 0 else scratch[(j - 1) % 2],
                    last,
                    np.ascontiguousarray(wt, np.float32),
                    b[og * 4 : og * 4 + 4].copy(),
                )
            )
    return passes


def _pool_passes(
    stage: Stage, src: int, dst: int, groups: int, limits: Limits, target: str
) -> list[Pass]:
    layer = stage.layer
    k = layer.kernel
    return [
        Pass(
            layer.op,
            stage.label,
            src,
            dst,
            g,
            tuple((g, ky, kx) for ky in range(k) for kx in range(k)),
            k,
            layer.stride,
            layer.padding,
            stage.relu,
        )
        for g in range(groups)
    ]
