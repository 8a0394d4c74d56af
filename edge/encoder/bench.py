"""Measuring encoders side by side: time per frame, the GL path's fixed cost, actions and returns.

Used by `splitedge bench encoder`; nothing here imports torch (the command adds its torch
reference as one more `encode` callable).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import numpy as np

from splitedge.ir import EncoderIR, Layer

Encode = Callable[[np.ndarray], np.ndarray]


def time_side_by_side(
    encoders: dict[str, Encode],
    frames: np.ndarray,
    batch: int,
    seconds: float,
    rounds: int = 3,
    warmup_s: float = 0.2,
) -> dict[str, float]:
    """Median seconds per frame of each encoder; rounds interleave the encoders so drift hits all alike."""
    batches = [frames[i : i + batch] for i in range(0, len(frames) - batch + 1, batch)]
    per_round: dict[str, list[float]] = {name: [] for name in encoders}
    for encode in encoders.values():  # warm-up: shaders compile, buffers grow, caches fill
        calls, start = 0, time.perf_counter()
        while calls < 5 or time.perf_counter() - start < warmup_s:
            encode(batches[calls % len(batches)])
            calls += 1
    for _ in range(rounds):
        for name, encode in encoders.items():
            calls, start = 0, time.perf_counter()
            while True:
                encode(batches[calls % len(batches)])
                calls += 1
                elapsed = time.perf_counter() - start
                if elapsed >= seconds / rounds and calls >= 5:
                    break
            per_round[name].append(elapsed / (calls * batch))
    return {name: float(np.median(v)) for name, v in per_round.items()}


def speed_rows(
    encoders: dict[str, Encode], frames: np.ndarray, batches: list[int], seconds: float
) -> list[dict[str, Any]]:
    """ms per frame and frames/s per encoder and batch size, and the ratio to torch's frames/s."""
    rows = []
    for batch in batches:
        times = time_side_by_side(encoders, frames, batch, seconds)
        base = times.get("torch")
        for name, t in times.items():
            rows.append(
                {
                    "backend": name,
                    "batch": batch,
                    "ms_per_frame": t * 1e3,
                    "frames_per_s": 1.0 / t,
                    "x_torch_fps": (base / t) if base else None,
                }
            )
    return rows


def gl_overhead_rows(
    ir: EncoderIR, targets: list[str], frames: np.ndarray, seconds: float, limits: Any = None
) -> list[dict[str, Any]]:
    """The GL path's fixed cost per frame (upload, one pass, readback) on each target, batch 1."""
    from edge.encoder.gl import GLEncoder

    probe_ir, probe_w = one_layer_ir(ir)
    probes = {t: GLEncoder(probe_ir, probe_w, t, limits, act_quant=[]) for t in targets}
    try:
        times = (
            time_side_by_side({t: p.encode for t, p in probes.items()}, frames, 1, seconds)
            if probes
            else {}
        )
    finally:
        for p in probes.values():
            p.close()
    return [
        {"backend": t, "net": "1 pass (1x1 conv)", "ms_per_frame": s * 1e3}
        for t, s in times.items()
    ]


def fidelity_rows(
    encoders: dict[str, Encode],
    reference: str,
    head: Any,
    observations: np.ndarray,
    env: Any,
    episodes: int,
) -> list[dict[str, Any]]:
    """Per encoder: features and head actions identical to the reference encoder's; mean return
    over `episodes` closed-loop episodes of `env` (the bundle's env, made by the caller)."""
    ref_feat = encoders[reference](observations)
    ref_act = head_actions(head, ref_feat)
    rows = []
    for name, encode in encoders.items():
        feat = encode(observations)
        row: dict[str, Any] = {
            "backend": name,
            "vs": reference,
            "features_identical_%": 100.0 * float(np.mean(feat == ref_feat)),
            "max_feature_diff": _max_diff(feat, ref_feat),
            "actions_identical_%": 100.0 * float(np.mean(head_actions(head, feat) == ref_act)),
        }
        if episodes > 0:
            row["mean_return"] = float(np.mean(episode_returns(encode, head, env, episodes)))
        rows.append(row)
    return rows


def _max_diff(a: np.ndarray, b: np.ndarray) -> int | float:
    """Largest absolute difference: in uint8 steps for quantised features, else in value units."""
    worst = float(np.abs(a.astype(np.float64) - b.astype(np.float64)).max())
    return int(worst) if a.dtype.kind in "iu" and b.dtype.kind in "iu" else worst


def one_layer_ir(ir: EncoderIR) -> tuple[EncoderIR, dict[str, np.ndarray]]:
    """A 1x1 conv to 4 channels on the same input: one pass, so its time is the GL path's fixed cost."""
    layer = Layer("conv", "probe", ir.channels, 4, 1, 1, 0)
    probe = EncoderIR(
        ir.channels,
        ir.height,
        ir.width,
        (layer, Layer("flatten")),
        input_scale=ir.input_scale,
        output_scale=ir.output_scale,
    )
    rng = np.random.default_rng(0)
    weights = {
        "probe.weight": rng.normal(0, 0.5, (4, ir.channels, 1, 1)).astype(np.float32),
        "probe.bias": np.zeros(4, np.float32),
    }
    return probe, weights


def head_actions(head: Any, features: np.ndarray) -> np.ndarray:
    """Actions of the bundle's head.onnx session for features (B, F) in the bundle's dtype."""
    return np.asarray(head.run(None, {head.get_inputs()[0].name: features})[0]).reshape(
        len(features), -1
    )[:, 0]


def episode_returns(
    encode: Encode, head: Any, env: Any, episodes: int, seed: int = 0
) -> list[float]:
    """Closed-loop returns in `env` with this encoder in the loop (deterministic head)."""
    discrete = hasattr(env.action_space, "n")
    name = head.get_inputs()[0].name
    returns = []
    for ep in range(episodes):
        obs, _ = env.reset(seed=seed + ep)
        done, total = False, 0.0
        while not done:
            out = np.asarray(head.run(None, {name: encode(obs[None])})[0])[0]
            action = int(out.reshape(-1)[0]) if discrete else out.reshape(env.action_space.shape)
            obs, reward, terminated, truncated, _ = env.step(action)
            total += float(reward)
            done = terminated or truncated
        returns.append(total)
    return returns
