"""The exported bundle against the model's own predict(deterministic=True).

`prove` runs the bundle's encoder + head and full graph with onnxruntime, and the es2
target's 8-bit storage through the reference interpreter, on observations of the user's
env: discrete actions must be identical, continuous within 1e-4 (es2, which cannot hold
1e-4 in 8-bit activations, is reported within one 256th of the action range).
`uint8_margin` says whether uint8 features keep every action with room to spare.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from models.sb3_policy import Actor, Argmax
from splitedge import ir

CONTINUOUS_TOL = 1e-4  # |bundle - predict| allowed per action component (float32 rounding)


def _compare(
    got: np.ndarray, want: np.ndarray, discrete: bool, tol: float = CONTINUOUS_TOL
) -> dict[str, Any]:
    """Share of observations whose action is predict's (discrete) or within `tol` of it."""
    got, want = np.asarray(got).reshape(len(want), -1), np.asarray(want).reshape(len(want), -1)
    if discrete:
        same = np.all(got == want, axis=1)
        return {"observations": len(want), "agree": float(same.mean())}
    diff = np.abs(got.astype(np.float64) - want.astype(np.float64)).max(axis=1)
    return {
        "observations": len(want),
        "agree": float((diff <= tol).mean()),
        "max_abs_diff": float(diff.max()),
        "tolerance": tol,
    }


def uint8_margin(
    actor: Actor, enc_ir: ir.EncoderIR, obs: np.ndarray, in_flight: np.ndarray | None = None
) -> tuple[bool, str]:
    """Whether uint8 features keep every action with room to spare, and the numbers.
    `in_flight`: a delay-aware head's other input, (N, D * width) as training encoded it.

    Passing the 200-observation check is not enough for a model not trained on the grid: an
    observation never checked may sit nearer a decision boundary. uint8 is chosen only when
    the largest change it makes to any logit is under a quarter of the smallest top-2 logit
    margin (or, for continuous actions, half the 1e-4 tolerance).
    """
    if actor.trained_quantised:
        return True, "trained on the uint8 grid"
    discrete = isinstance(actor.head[-1], Argmax)
    body = actor.head[:-1] if discrete else actor.head
    with torch.no_grad():
        f = actor.encoder.net(torch.as_tensor(obs).float() * actor.input_scale).flatten(1)
        q = torch.clamp(torch.round(f / enc_ir.output_scale) + enc_ir.output_zero_point, 0, 255)
        fq = (q - enc_ir.output_zero_point) * enc_ir.output_scale
        extra = [] if in_flight is None else [torch.as_tensor(in_flight, dtype=torch.float32)]
        exact = body(torch.cat([actor.post(f), *extra], dim=1))
        grid = body(torch.cat([actor.post(fq), *extra], dim=1))
    shift = float((exact - grid).abs().max())
    if not discrete:
        return 2 * shift <= CONTINUOUS_TOL, f"moves actions by up to {shift:.3g}"
    top2 = exact.topk(2, dim=1).values
    gap = float((top2[:, 0] - top2[:, 1]).min())
    return 4 * shift < gap, f"moves logits by up to {shift:.3g}; the smallest margin is {gap:.3g}"


def es2_tolerance(action_space: Any) -> float:
    """8-bit activations cannot hold 1e-4: es2 agrees within one 256th of the action range."""
    if hasattr(action_space, "n"):
        return 0.0
    span = np.asarray(action_space.high, np.float64) - np.asarray(action_space.low, np.float64)
    return float(span.min()) / 256.0


def _es2_features(
    enc_ir: ir.EncoderIR, weights: dict[str, np.ndarray], obs: np.ndarray
) -> np.ndarray:
    """What the es2 target (8-bit storage between passes) sends, by the reference interpreter."""
    from edge.encoder.calibrate import from_ir
    from edge.encoder.reference import encode, fake_quant, forward

    act_quant = from_ir(enc_ir)
    if enc_ir.output_dtype == "uint8":
        return encode(enc_ir, weights, obs, act_quant)
    f = forward(enc_ir, weights, obs, act_quant)  # es2's last stage is stored on the output grid
    return fake_quant(f, enc_ir.output_scale, enc_ir.output_zero_point).astype(np.float32)


def prove(
    bundle_dir: Path,
    enc_ir: ir.EncoderIR,
    weights: dict[str, np.ndarray],
    obs: np.ndarray,
    want: np.ndarray,
    action_space: Any,
    extra: dict[str, np.ndarray] | None = None,
) -> dict[str, Any]:
    """Agreement of the bundle's ort split, ort full graph and es2 reference with predict;
    `extra`: more head (and full) inputs by name, e.g. a delay-aware head's actions in flight."""
    import onnxruntime as ort

    def session(name: str) -> Any:
        return ort.InferenceSession(str(bundle_dir / name), providers=["CPUExecutionProvider"])

    discrete = hasattr(action_space, "n")
    enc, head, full = session("encoder.onnx"), session("head.onnx"), session("full.onnx")
    more = dict(extra or {})
    feats = enc.run(None, {"observation": obs})[0]
    es2 = _es2_features(enc_ir, weights, obs).astype(feats.dtype)
    return {
        "ort": _compare(head.run(None, {"features": feats, **more})[0], want, discrete),
        "full": _compare(full.run(None, {"observation": obs, **more})[0], want, discrete),
        "es2_reference": _compare(
            head.run(None, {"features": es2, **more})[0],
            want,
            discrete,
            es2_tolerance(action_space),
        ),
    }


MAX_ROUNDING_SHARE = 1e-3  # of feature values; more is not float rounding at a half step


def rounding_only(
    actor: Actor,
    bundle_dir: Path,
    obs: np.ndarray,
    want: np.ndarray,
    action_space: Any,
    extra: dict[str, np.ndarray] | None = None,
) -> dict[str, Any] | None:
    """For a trained-quantised encoder (features on the uint8 grid in training) whose uint8
    bundle missed predict on a few observations: the evidence that every miss is float
    rounding, or None when it is not. torch and onnxruntime sum a conv's products in
    different orders (and SB3 divides by 255 where the export multiplies by 1/255), so a
    value that lands on a half step of the grid can round either way, and a steep head
    turns that one step into a visible action change. Evidence: the
    bundle's features are torch's on the grid except for a few values one step off, and the
    bundle's head on torch's own features gives predict's actions on every observation."""
    import onnxruntime as ort

    if not actor.trained_quantised:
        return None

    def session(name: str) -> Any:
        return ort.InferenceSession(str(bundle_dir / name), providers=["CPUExecutionProvider"])

    feats = session("encoder.onnx").run(None, {"observation": obs})[0]
    if feats.dtype != np.uint8:
        return None
    with torch.no_grad():
        x = torch.as_tensor(obs).float()
        # as SB3's preprocess_obs does: x / 255 and x * (1 / 255) differ in the last bit
        x = x / 255.0 if actor.input_scale == 1.0 / 255.0 else x * actor.input_scale
        codes = actor.encoder.quant.to_uint8(actor.encoder.net(x).flatten(1)).numpy()
    off = np.abs(feats.astype(np.int16) - codes.astype(np.int16))
    if off.shape != codes.shape or int(off.max()) > 1 or off.mean() > MAX_ROUNDING_SHARE:
        return None
    discrete = hasattr(action_space, "n")
    head = session("head.onnx").run(None, {"features": codes, **dict(extra or {})})[0]
    same = _compare(head, want, discrete)
    if same["agree"] != 1.0:
        return None
    return {
        "feature_values_one_step_off": int(off.sum()),
        "feature_values": int(off.size),
        "observations_touched": int((off > 0).any(axis=1).sum()),
        "head_on_torch_features": same,
    }


def passes(check: dict[str, Any]) -> bool:
    return bool(check["ort"]["agree"] == 1.0 and check["full"]["agree"] == 1.0)


def describe(check: dict[str, Any]) -> str:
    parts = []
    for k in ("ort", "full"):
        c = check[k]
        diff = f", max |diff| {c['max_abs_diff']:.3g}" if "max_abs_diff" in c else ""
        parts.append(f"{k} {c['agree'] * c['observations']:.0f}/{c['observations']}{diff}")
    return ", ".join(parts)
