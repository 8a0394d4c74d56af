"""The health gate's probe: a fixed observation and the features this machine's encoder.onnx gives it.

Computed at flash time with onnxruntime on the flashing machine and carried to
the device, which encodes the same frame with its own backend and must agree
within a small tolerance (quantised features: a float rounding difference moves
a value by one step, a wrong encoder moves many by a lot). Float32 features are
compared in steps too: the bundle's 8-bit storage scale when it records one, else
1/255 of the probe's largest feature (see `feature_step`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from splitedge.bundle import Bundle

TOLERANCE_LSB = 2  # feature steps; GL backends store activations in 8 bits between layers


def probe_frame(bundle: Bundle, seed: int = 0) -> tuple[np.ndarray, str]:
    """A deterministic observation: the task's first frame when the task is known, else seeded noise."""
    policy = bundle.policy
    shape = tuple(policy["observation"]["shape"])
    try:
        from edge.envs import make_env, tasks

        if policy.get("task") in tasks():
            # a few steps in, the stacked frames differ (motion), a richer probe than the first frame
            env = make_env(policy["task"], seed=seed)
            obs, _ = env.reset(seed=seed)
            for _ in range(3):
                obs, *_ = env.step(env.action_space.sample())  # seeded by make_env
            if obs.shape == shape:
                return np.ascontiguousarray(
                    obs, dtype=np.uint8
                ), f"{policy['task']} seed {seed}, 3 seeded random steps"
    except ImportError:
        pass
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, size=shape, dtype=np.uint8), f"uniform noise, seed {seed}"


def feature_step(bundle: Bundle, features: np.ndarray) -> float:
    """One LSB in feature units: 1 for uint8 features; for float32, the bundle's scale (the es2
    final-stage storage step) when > 0, else 1/255 of the probe's largest absolute feature."""
    out = bundle.policy["encoder"]["output"]
    if str(out["dtype"]) == "uint8":
        return 1.0
    scale = float(out.get("scale") or 0.0)
    return scale if scale > 0 else max(float(np.abs(features).max()), 1e-6) / 255.0


def write_probe(bundle: Bundle, out: Path) -> dict[str, Any]:
    """Compute the expected features with encoder.onnx here and save frame + features to out (.npz)."""
    from edge.encoder import make_encoder

    frame, source = probe_frame(bundle)
    encoder, _ = make_encoder(bundle, "ort")
    try:
        features = encoder.encode(frame[None])[0]
    finally:
        encoder.close()
    step = feature_step(bundle, features)
    np.savez(
        out,
        frame=frame,
        features=features,
        tolerance_lsb=np.int64(TOLERANCE_LSB),
        step=np.float64(step),
    )
    return {
        "probe": source,
        "features": int(features.size),
        "dtype": str(features.dtype),
        "step": step,
        "nonzero": int(np.count_nonzero(features)),
        "tolerance_lsb": TOLERANCE_LSB,
    }
