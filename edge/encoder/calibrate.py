"""Per-stage 8-bit activation scales for es2 storage, chosen from calibration frames.

A blind clamp to [0, 1] would throw away range above 1 and resolution below it; instead
each stored stage gets scale = (max - min) / 255 over a calibration batch (min is 0 after
a ReLU, so the zero point is 0 and the full 8 bits cover [0, max]).
The scales travel in the IR's `extra["activation_quant"]` so a bundle can record them.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from edge.encoder.reference import ActQuant, forward_stages, stages
from splitedge.ir import EncoderIR

EXTRA_KEY = "activation_quant"


def calibrate(ir: EncoderIR, weights: dict[str, np.ndarray], frames: np.ndarray) -> list[ActQuant]:
    """Scales for every stored stage (all but the last) from uint8 frames (N, C, H, W)."""
    if len(frames) == 0:
        raise ValueError("calibration needs at least one frame")
    outs = forward_stages(ir, weights, frames)
    result = []
    for stage, out in zip(stages(ir)[:-1], outs[:-1], strict=False):
        lo, hi = min(float(out.min()), 0.0), max(float(out.max()), 0.0)
        scale = (hi - lo) / 255.0 if hi > lo else 1.0
        zero_point = int(np.clip(round(-lo / scale), 0, 255))
        result.append(ActQuant(stage.index, scale, zero_point))
    return result


def to_extra(act_quant: Sequence[ActQuant]) -> list[dict[str, Any]]:
    """JSON form for ir.extra[EXTRA_KEY]."""
    return [{"layer": q.layer, "scale": q.scale, "zero_point": q.zero_point} for q in act_quant]


def from_ir(ir: EncoderIR) -> list[ActQuant] | None:
    """Scales recorded in the IR, or None when it records none."""
    raw = ir.extra.get(EXTRA_KEY)
    if not raw:
        return None
    return [ActQuant(int(d["layer"]), float(d["scale"]), int(d.get("zero_point", 0))) for d in raw]


def task_frames(task: str, count: int = 256, seed: int = 0) -> np.ndarray:
    """uint8 observations (count, C, H, W) from random-action episodes of a pixel task."""
    from edge.envs import make_env

    return env_frames(make_env(task, seed=seed), count, seed)


def policy_frames(
    policy: dict[str, Any],
    count: int = 256,
    seed: int = 0,
    env: str | None = None,
    env_kwargs: dict[str, Any] | None = None,
) -> np.ndarray:
    """Observations of a policy bundle's env (`env` when given, else the one it records)."""
    from edge.envs import make_policy_env

    source = make_policy_env(policy, env, env_kwargs, seed=seed)
    try:
        return env_frames(source, count, seed)
    finally:
        source.close()


def env_frames(env: Any, count: int, seed: int = 0) -> np.ndarray:
    """uint8 observations (count, C, H, W) from random-action episodes of `env` (any action space)."""
    rng = np.random.default_rng(seed)
    space = env.action_space
    space.seed(seed)
    frames: list[np.ndarray] = []
    obs, _ = env.reset(seed=seed)
    while len(frames) < count:
        frames.append(obs)
        if hasattr(space, "n"):  # Discrete: the same draws as before Box spaces were supported
            action: Any = int(getattr(space, "start", 0)) + int(rng.integers(space.n))
        else:
            action = space.sample()
        obs, _, terminated, truncated, _ = env.step(action)
        if terminated or truncated:
            obs, _ = env.reset(seed=seed + len(frames))
    return np.stack(frames).astype(np.uint8)
