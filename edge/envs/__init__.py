"""Pixel-observation control tasks, shared by training (models/) and the device loop (edge/).

Observations are rasterised from the simulator's true state into small uint8 frames:
cheaper than rendering with pygame, and faithful because the frame is a deterministic
picture of exactly the state the policy must act on. Frames are stacked for velocity.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from splitedge.errors import SplitedgeError

_FACTORIES: dict[str, Callable[..., Any]] = {}


def register(task: str) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    def deco(fn: Callable[..., Any]) -> Callable[..., Any]:
        _FACTORIES[task] = fn
        return fn

    return deco


def tasks() -> list[str]:
    """Names of the pixel tasks this build knows."""
    _load()
    return sorted(_FACTORIES)


def make_env(task: str, seed: int | None = None, **kwargs: Any) -> Any:
    """A gymnasium env with uint8 (C, H, W) observations for a task name."""
    _load()
    if task not in _FACTORIES:
        raise SplitedgeError(f"unknown task {task!r}; known tasks: {', '.join(sorted(_FACTORIES))}")
    env = _FACTORIES[task](**kwargs)
    if seed is not None:
        env.reset(seed=seed)
        env.action_space.seed(seed)
    return env


def _load() -> None:
    # each module registers itself
    from edge.envs import pixel_cartpole, pixel_pendulum, pixel_reacher  # noqa: F401
