"""numpy <-> splitedge.v1.Tensor on the device side, and the frame codecs for raw offload."""

from __future__ import annotations

import io
from typing import Any

import numpy as np

from protos import policy_pb2 as pb
from splitedge.errors import SplitedgeError
from splitedge.frame_images import stacks_planes

DTYPES: dict[str, Any] = {
    "uint8": pb.UINT8,
    "float16": pb.FLOAT16,
    "float32": pb.FLOAT32,
    "int64": pb.INT64,
    "int32": pb.INT32,
}
NUMPY_OF = {v: np.dtype(k) for k, v in DTYPES.items()}
CODECS = {"none": pb.CODEC_NONE, "png": pb.CODEC_PNG, "jpeg": pb.CODEC_JPEG}


def to_tensor(array: np.ndarray, scale: float = 0.0, zero_point: int = 0) -> pb.Tensor:
    """A raw (codec none) tensor carrying the array's bytes, little-endian."""
    a = np.ascontiguousarray(array)
    return pb.Tensor(
        shape=list(a.shape),
        dtype=DTYPES[a.dtype.name],
        data=a.tobytes(),
        scale=scale,
        zero_point=zero_point,
    )


def features_tensor(features: np.ndarray, output: dict[str, Any]) -> pb.Tensor:
    """One sample's features (F,) as the bundle's encoder output spec says they travel.

    uint8 features carry the bundle's scale/zero_point; float32 ones are plain values (scale 0).
    An encoder whose dtype is not the bundle's is refused here rather than relabelled.
    """
    dtype = str(output["dtype"])
    if features.dtype != np.dtype(dtype):
        raise SplitedgeError(
            f"the encoder returned {features.dtype} features but the bundle's are {dtype}; "
            "use a backend that supports this bundle (--backend ort always does)"
        )
    if dtype == "uint8":
        return to_tensor(features, scale=output["scale"], zero_point=output["zero_point"])
    return to_tensor(features.astype("<f4", copy=False))


def from_tensor(t: pb.Tensor) -> np.ndarray:
    """The array a raw tensor carries (raises ValueError on a size mismatch)."""
    dtype = NUMPY_OF.get(t.dtype)
    if dtype is None or t.codec != pb.CODEC_NONE:
        raise ValueError(f"cannot decode tensor dtype={t.dtype} codec={t.codec}")
    shape = tuple(t.shape)
    if len(t.data) != int(np.prod(shape)) * dtype.itemsize:
        raise ValueError(f"tensor of shape {shape} {dtype} has {len(t.data)} bytes")
    return np.frombuffer(t.data, dtype=dtype).reshape(shape)


def encode_frame(frame: np.ndarray, codec: str, jpeg_quality: int = 90) -> pb.Tensor:
    """A uint8 (C, H, W) frame as a tensor; png/jpeg put the C planes in an image's channels
    (L, RGB, RGBA), or stack them into one grey image when C has no image mode."""
    if codec == "none":
        return to_tensor(frame)
    from PIL import Image

    c = frame.shape[0]
    if stacks_planes(c, codec):
        hwc = np.ascontiguousarray(frame.reshape(c * frame.shape[1], frame.shape[2]))
    else:
        hwc = frame[0] if c == 1 else np.ascontiguousarray(frame.transpose(1, 2, 0))
    buf = io.BytesIO()
    img = Image.fromarray(hwc)  # infers L / RGB / RGBA from the array shape
    if codec == "png":
        img.save(buf, format="PNG", compress_level=1)  # fast: the device CPU is the scarce part
    else:
        img.save(buf, format="JPEG", quality=jpeg_quality)
    return pb.Tensor(
        shape=list(frame.shape), dtype=pb.UINT8, data=buf.getvalue(), codec=CODECS[codec]
    )
