"""Observations of the user's own env (or frames file) for calibration and the self-check.

Export never guesses a task: it calibrates the feature grid and es2 activation scales on
observations the model will really see, and checks the bundle against `predict` on
others. From an env they come from the model's own (stochastic) rollouts, with some
random actions mixed in so states the policy rarely reaches are covered too.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from splitedge.errors import SplitedgeError

CALIBRATION = 256
CHECK = 200  # observations the exported bundle must agree with predict on
RANDOM_ACTION = 0.25  # share of random actions in the rollouts


@dataclass
class Observations:
    """uint8 (N, C, H, W) calibration and check sets, and where they came from."""

    calibration: np.ndarray
    check: np.ndarray
    source: str
    env: dict[str, Any] | None  # {"id", "kwargs"} recorded in the manifest, or None (frames)


def rollout(model: Any, name: str, kwargs: dict[str, Any], count: int, seed: int) -> np.ndarray:
    """`count` observations (C, H, W) from the model acting in env `name`."""
    shape = tuple(int(d) for d in model.observation_space.shape)
    import torch

    # per-step predict on one small frame: extra threads only contend (2.7 ms vs 81 ms a step
    # measured on 2 busy cores)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _rollout(model, name, kwargs, count, seed, shape)
    finally:
        torch.set_num_threads(threads)


def _rollout(
    model: Any, name: str, kwargs: dict[str, Any], count: int, seed: int, shape: tuple[int, ...]
) -> np.ndarray:
    from edge.envs import make_env

    env = make_env(name, expect_shape=shape, **kwargs)
    if env.action_space != model.action_space:
        raise SplitedgeError(
            f"env {name!r} has action space {env.action_space}, the model {model.action_space}; "
            "pass the env (and --env-kwargs) the model was trained on"
        )
    rng = np.random.default_rng(seed)
    env.action_space.seed(seed)
    obs, _ = env.reset(seed=seed)
    out: list[np.ndarray] = []
    while len(out) < count:
        out.append(np.asarray(obs, np.uint8))
        if rng.random() < RANDOM_ACTION:
            action = env.action_space.sample()
        else:
            action, _ = model.predict(obs, deterministic=False)
        obs, _, terminated, truncated, _ = env.step(action)
        if terminated or truncated:
            obs, _ = env.reset(seed=seed + 1000 + len(out))
    return np.stack(out)


def load_frames(path: Path, shape: tuple[int, ...]) -> np.ndarray:
    """uint8 (N, C, H, W) from an .npy of (N, C, H, W) or (N, H, W, C); refuses anything else."""
    try:
        frames = np.load(path, allow_pickle=False)
    except (OSError, ValueError) as e:
        raise SplitedgeError(f"--frames {path}: not a readable .npy array ({e})") from e
    if frames.dtype != np.uint8:
        raise SplitedgeError(f"--frames {path}: dtype {frames.dtype}; observations must be uint8")
    if (
        frames.ndim == 4
        and frames.shape[1:] != shape
        and (frames.shape[3], frames.shape[1], frames.shape[2]) == shape
    ):
        frames = np.ascontiguousarray(frames.transpose(0, 3, 1, 2))
    if frames.ndim != 4 or frames.shape[1:] != shape:
        raise SplitedgeError(
            f"--frames {path}: shape {frames.shape}; the model expects (N, {', '.join(map(str, shape))})"
        )
    if len(frames) < CHECK:
        raise SplitedgeError(
            f"--frames {path}: {len(frames)} observations; the self-check needs at least {CHECK}"
        )
    return frames


def gather(
    model: Any, env: str | None, env_kwargs: dict[str, Any] | None, frames: Path | None
) -> Observations:
    """Calibration and check observations from `frames`, else from `env`; refuses neither."""
    shape = tuple(int(d) for d in model.observation_space.shape)
    if frames is not None:
        data = load_frames(frames, shape)
        return Observations(data, data[:CHECK], f"frames {frames.name}", None)
    if env is None:
        raise SplitedgeError(
            "export needs observations of the model's env: pass --env ID_OR_ENTRY_POINT (a "
            "gymnasium id or package.module:ClassName) or --frames FILE.npy"
        )
    kwargs = dict(env_kwargs or {})
    calibration = rollout(model, env, kwargs, CALIBRATION, seed=0)
    check = rollout(model, env, kwargs, CHECK, seed=1)
    return Observations(calibration, check, f"env {env}", {"id": env, "kwargs": kwargs})
