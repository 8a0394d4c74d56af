"""Turn a request's Tensor into one model sample, or refuse it with a RequestError that says why.

Raw frames (MODE_RAW) may arrive in three encodings; a client must produce them this way
(edge/wire.py `encode_frame` does):

* CODEC_NONE: ``Tensor(shape=[C, H, W], dtype=UINT8, data=frame.tobytes())`` of a C-contiguous
  uint8 (C, H, W) array.
* CODEC_PNG / CODEC_JPEG: the (C, H, W) uint8 frame becomes an H x W image with Pillow,
  the C planes as the image's colour channels:
  C=1 -> mode 'L' from ``frame[0]``; C=3 -> mode 'RGB' from ``frame.transpose(1, 2, 0)``
  (plane 0 = R, 1 = G, 2 = B); C=4 -> 'RGBA' likewise for PNG. Any other C (2, 5+, and 4
  for JPEG, which has no 4-channel mode): one mode 'L' image of the planes stacked
  vertically, ``frame.reshape(C * H, W)``, W wide and C*H tall.
  ``Tensor.shape`` is still [C, H, W] and ``dtype`` UINT8; ``data`` is the encoded file.
  The server decodes with Pillow and transposes back to (C, H, W).

Features (MODE_SPLIT) are ``Tensor(shape=[F], ...)`` with no batch dim, in the bundle's
feature dtype. A uint8 bundle takes UINT8 with the bundle's scale/zero_point, or FLOAT32
dequantised values, which the server quantises. A float32 bundle (a model trained without
quantisation) takes FLOAT32 only, as they are; its head.onnx reads float32.
"""

from __future__ import annotations

import io
import math
import warnings

import numpy as np

from protos import policy_pb2 as pb
from server.errors import Kind, RequestError, echo
from server.models import Spec
from splitedge.frame_images import image_mode_and_height, stacks_planes

PROTO_DTYPES: dict[str, pb.DType] = {
    "uint8": pb.UINT8,
    "float16": pb.FLOAT16,
    "float32": pb.FLOAT32,
    "int64": pb.INT64,
    "int32": pb.INT32,
}
DTYPE_NAMES: dict[int, str] = {v: k for k, v in PROTO_DTYPES.items()}
CODEC_NAMES: dict[int, str] = {pb.CODEC_NONE: "none", pb.CODEC_PNG: "PNG", pb.CODEC_JPEG: "JPEG"}
SCALE_RTOL = 1e-6  # Tensor.scale is a float32 on the wire; the bundle keeps a float64


def _invalid(message: str) -> RequestError:
    return RequestError(Kind.INVALID, message)


def _dtype_name(dtype: int) -> str:
    return DTYPE_NAMES.get(dtype, f"unknown ({dtype})")


def _codec_name(codec: int) -> str:
    return CODEC_NAMES.get(codec, f"codec #{codec}")


def _check_shape(t: pb.Tensor, spec: Spec, what: str) -> None:
    if tuple(t.shape) != spec.shape:
        raise _invalid(
            f"{what} shape {echo(list(t.shape))} != expected {list(spec.shape)} "
            "(one sample, no batch dimension)"
        )


def _raw_array(t: pb.Tensor, spec: Spec, dtype: str, what: str) -> np.ndarray:
    expected = math.prod(spec.shape) * np.dtype(dtype).itemsize
    if len(t.data) != expected:
        raise _invalid(
            f"{what} data is {len(t.data)} bytes; {dtype}{list(spec.shape)} needs {expected}"
        )
    return np.frombuffer(t.data, dtype=np.dtype(dtype).newbyteorder("<")).reshape(spec.shape)


def scale_matches(a: float, b: float) -> bool:
    """Quantisation scales equal up to float32 rounding."""
    return math.isclose(a, b, rel_tol=SCALE_RTOL, abs_tol=0.0)


def features_sample(t: pb.Tensor, spec: Spec) -> np.ndarray:
    """A split-mode request's features as the head's input row (spec.dtype), shape spec.shape."""
    if t.codec != pb.CODEC_NONE:
        raise _invalid(f"features must use codec NONE, got {_codec_name(t.codec)}")
    if not spec.quantised:
        return _float_features(t, spec)
    if t.dtype not in (pb.UINT8, pb.FLOAT32):
        raise _invalid(
            f"features dtype {_dtype_name(t.dtype)} not accepted; send UINT8 "
            f"(scale {spec.scale:.6g}, zero_point {spec.zero_point}) or FLOAT32"
        )
    _check_shape(t, spec, "features")
    if t.dtype == pb.UINT8:
        if not scale_matches(t.scale, spec.scale) or t.zero_point != spec.zero_point:
            raise _invalid(
                f"features quantised with scale {t.scale:.6g} zero_point {t.zero_point}; "
                f"bundle expects scale {spec.scale:.6g} zero_point {spec.zero_point}"
            )
        return _raw_array(t, spec, "uint8", "features")  # the batcher's np.stack copies it
    x = _finite(_raw_array(t, spec, "float32", "features"))
    q = np.rint(x.astype(np.float64) / spec.scale) + spec.zero_point
    return np.clip(q, 0, 255).astype(np.uint8)


def _float_features(t: pb.Tensor, spec: Spec) -> np.ndarray:
    """A float32 bundle's features: FLOAT32 values taken as they are (no quantisation)."""
    if t.dtype != pb.FLOAT32:
        raise _invalid(
            f"features dtype {_dtype_name(t.dtype)} not accepted; this bundle's features are "
            f"{spec.describe()}: send FLOAT32 values, not quantised ones"
        )
    _check_shape(t, spec, "features")
    return _finite(_raw_array(t, spec, "float32", "features"))


def _finite(x: np.ndarray) -> np.ndarray:
    bad = int(np.count_nonzero(~np.isfinite(x)))
    if bad:
        raise _invalid(
            f"features contain NaN or Inf ({bad} of {x.size} values); send finite values"
        )
    return x


def observation_sample(t: pb.Tensor, spec: Spec) -> np.ndarray:
    """A raw-mode request's frame as full.onnx's uint8 (C, H, W) input row (decoding PNG/JPEG)."""
    if t.dtype != pb.UINT8:
        raise _invalid(f"observation dtype {_dtype_name(t.dtype)} not accepted; frames are UINT8")
    _check_shape(t, spec, "observation")
    if t.codec == pb.CODEC_NONE:
        return _raw_array(t, spec, "uint8", "observation")
    if t.codec not in (pb.CODEC_PNG, pb.CODEC_JPEG):
        raise _invalid(f"unknown {_codec_name(t.codec)}; use NONE, PNG or JPEG")
    return decode_frame(t.data, _codec_name(t.codec), spec)


def decode_frame(data: bytes, codec: str, spec: Spec) -> np.ndarray:
    """Decode a PNG/JPEG frame made as the module docstring says back to uint8 (C, H, W)."""
    from PIL import Image, UnidentifiedImageError

    if len(spec.shape) != 3:
        raise _invalid(
            f"{codec} frames need a [C, H, W] observation; this bundle's is {list(spec.shape)}"
        )
    c, h, w = spec.shape
    stacked = stacks_planes(c, codec)  # see the module docstring
    mode, img_h = image_mode_and_height(c, h, codec)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img: Image.Image = Image.open(io.BytesIO(data), formats=[codec])  # header only
        # size first, before decoding a single pixel: a hostile header cannot make us allocate
        if img.size != (w, img_h):
            raise _invalid(
                f"{codec} image is {img.size[0]}x{img.size[1]} ({img.mode}); "
                f"bundle expects {w}x{img_h} {mode}"
            )
        if img.mode == "P" and codec == "PNG":
            img = img.convert(mode)  # a palette PNG expands losslessly
        if img.mode != mode:
            raise _invalid(
                f"{codec} image has mode {img.mode}; a [{c}, {h}, {w}] frame is mode {mode}"
            )
        img.load()
        hwc = np.asarray(img, dtype=np.uint8)  # (H, W) for L, (H, W, C) otherwise
    except RequestError:
        raise
    except UnidentifiedImageError:
        raise _invalid(f"data is not a {codec} image (its header is not {codec})") from None
    except Exception as e:  # Pillow raises many types for hostile bytes; all mean "bad image"
        raise _invalid(
            f"data is not a valid {codec} image ({type(e).__name__}: {echo(e)})"
        ) from None
    if stacked:
        return np.ascontiguousarray(hwc.reshape(c, h, w))
    chw = hwc[None] if hwc.ndim == 2 else hwc.transpose(2, 0, 1)
    return np.ascontiguousarray(chw)  # (C, H, W)
