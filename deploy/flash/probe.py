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


def probe_frame(
    bundle: Bundle, seed: int = 0, source: dict[str, Any] | None = None
) -> tuple[np.ndarray, str]:
    """A deterministic observation: an early frame of the bundle's env (or the release's source
    env) when it can be made here, else seeded noise (saying why)."""
    from edge.envs import make_policy_env, policy_env_spec
    from splitedge.errors import SplitedgeError

    policy = bundle.policy
    shape = tuple(policy["observation"]["shape"])
    source = source or {}
    try:
        name, _ = policy_env_spec(policy, source.get("env"), source.get("env_kwargs"))
        env = make_policy_env(policy, source.get("env"), source.get("env_kwargs"), seed=seed)
        try:
            # a few steps in, stacked frames differ (motion): a richer probe than the first frame
            obs, _ = env.reset(seed=seed)
            for _ in range(3):
                obs, *_ = env.step(env.action_space.sample())  # seeded by make_env
        finally:
            env.close()
        return np.ascontiguousarray(
            obs, dtype=np.uint8
        ), f"{name} seed {seed}, 3 seeded random steps"
    except (ImportError, SplitedgeError) as e:
        why = str(e).split(";")[0]
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, size=shape, dtype=np.uint8), f"uniform noise, seed {seed} ({why})"


def feature_step(bundle: Bundle, features: np.ndarray) -> float:
    """One LSB in feature units: 1 for uint8 features; for float32, the bundle's scale (the es2
    final-stage storage step) when > 0, else 1/255 of the probe's largest absolute feature."""
    out = bundle.policy["encoder"]["output"]
    if str(out["dtype"]) == "uint8":
        return 1.0
    scale = float(out.get("scale") or 0.0)
    return scale if scale > 0 else max(float(np.abs(features).max()), 1e-6) / 255.0


def write_probe(bundle: Bundle, out: Path, source: dict[str, Any] | None = None) -> dict[str, Any]:
    """Compute the expected features with encoder.onnx here and save frame + features to out (.npz).

    source: the release's [source] table; an env there is used for the probe frame."""
    from edge.encoder import make_encoder

    frame, source_name = probe_frame(bundle, source=source)
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
        "probe": source_name,
        "features": int(features.size),
        "dtype": str(features.dtype),
        "step": step,
        "nonzero": int(np.count_nonzero(features)),
        "tolerance_lsb": TOLERANCE_LSB,
    }
