"""Pixel-observation control tasks, shared by training (models/) and the device loop (edge/).

Observations are rasterised from the simulator's true state into small uint8 frames:
cheaper than rendering with pygame, and faithful because the frame is a deterministic
picture of exactly the state the policy must act on. Frames are stacked for velocity.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Sequence
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


def make_env(
    task: str,
    seed: int | None = None,
    expect_shape: Sequence[int] | None = None,
    **kwargs: Any,
) -> Any:
    """A gymnasium env with uint8 (C, H, W) observations.

    `task` is one of our pixel tasks, a user's ``package.module:ClassName`` entry point, or
    a registered gymnasium id; `kwargs` go to its constructor. With `expect_shape` (C, H, W),
    an env that gives (H, W, C) images is transposed (as SB3 does for image envs) and any
    other shape or dtype is refused in one line.
    """
    _load()
    if task in _FACTORIES:
        env = _FACTORIES[task](**kwargs)
    elif ":" in task:
        env = _entry_point(task)(**kwargs)
    else:
        env = _gymnasium_env(task, kwargs)
    if expect_shape is not None:
        env = conform(env, tuple(int(d) for d in expect_shape), task)
    if seed is not None:
        env.reset(seed=seed)
        env.action_space.seed(seed)
    return env


def describe(task: str | None, env_kwargs: dict[str, Any] | None = None) -> dict[str, Any]:
    """The manifest's record of where observations come from: {"id": ..., "kwargs": {...}}."""
    return {"id": task, "kwargs": dict(env_kwargs or {})}


def bundle_env(policy: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    """(env id or entry point, constructor kwargs) a policy bundle was exported with.

    Raises SplitedgeError when the bundle names neither an env nor one of our tasks.
    """
    env = policy.get("env") or {}
    name = env.get("id") or policy.get("task")
    if not name:
        raise SplitedgeError(
            "the bundle names no env; pass --env ID_OR_ENTRY_POINT (a gymnasium id or "
            "package.module:ClassName) for its observations"
        )
    return str(name), dict(env.get("kwargs") or {})


def policy_env_spec(
    policy: dict[str, Any], env: str | None = None, env_kwargs: dict[str, Any] | None = None
) -> tuple[str, dict[str, Any]]:
    """(env, kwargs) a policy bundle acts in: `env` when given, else its recorded env or task.

    `env_kwargs` replace the recorded kwargs when given; a different `env` starts from none.
    """
    if env:
        recorded = (policy.get("env") or {}).get("id")
        kwargs = dict((policy.get("env") or {}).get("kwargs") or {}) if env == recorded else {}
        name = env
    else:
        name, kwargs = bundle_env(policy)
    return name, dict(env_kwargs) if env_kwargs is not None else kwargs


def make_policy_env(
    policy: dict[str, Any],
    env: str | None = None,
    env_kwargs: dict[str, Any] | None = None,
    seed: int | None = None,
) -> Any:
    """The env for a policy bundle (policy_env_spec), its observations checked against the
    bundle's (C, H, W) shape; refuses a wrong env in one line."""
    name, kwargs = policy_env_spec(policy, env, env_kwargs)
    try:
        return make_env(name, seed=seed, expect_shape=policy["observation"]["shape"], **kwargs)
    except TypeError as e:  # the constructor does not take these kwargs
        raise SplitedgeError(f"env {name!r} with kwargs {kwargs}: {e}") from e


def _entry_point(spec: str) -> Callable[..., Any]:
    module_name, _, attr = spec.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:
        raise SplitedgeError(
            f"env {spec!r}: cannot import {module_name!r} ({e}); install the package that "
            "defines it in this environment, or put its folder on PYTHONPATH"
        ) from e
    factory = getattr(module, attr, None)
    if not callable(factory):
        raise SplitedgeError(f"env {spec!r}: module {module_name!r} has no callable {attr!r}")
    return factory  # type: ignore[no-any-return]


def _gymnasium_env(name: str, kwargs: dict[str, Any]) -> Any:
    import gymnasium

    try:
        return gymnasium.make(name, **kwargs)
    except gymnasium.error.Error as e:
        raise SplitedgeError(
            f"unknown env {name!r}: not one of our tasks ({', '.join(sorted(_FACTORIES))}) "
            f"nor a registered gymnasium id ({e}); a user env is given as package.module:ClassName"
        ) from e


def conform(env: Any, shape: tuple[int, ...], name: str) -> Any:
    """`env` with uint8 (C, H, W) observations of `shape`, transposing (H, W, C) images."""
    import gymnasium
    import numpy as np

    space = env.observation_space
    got = tuple(getattr(space, "shape", None) or ())
    dtype = getattr(space, "dtype", None)
    if not isinstance(space, gymnasium.spaces.Box) or dtype != np.uint8:
        raise SplitedgeError(
            f"env {name!r} gives {type(space).__name__} observations of dtype {dtype}; "
            "a policy bundle needs uint8 images (Dict observations / MultiInputPolicy are "
            "not supported)"
        )
    if got == shape:
        return env
    if len(got) == 3 and (got[2], got[0], got[1]) == shape:
        return _ChannelsFirst(env)
    raise SplitedgeError(
        f"env {name!r} gives observations of shape {got}; the model expects {shape} (C, H, W)"
    )


class _ChannelsFirst:
    """(H, W, C) image env seen as (C, H, W), as SB3's VecTransposeImage does in training."""

    def __init__(self, env: Any):
        import gymnasium
        import numpy as np

        self.env = env
        low = np.transpose(env.observation_space.low, (2, 0, 1))
        high = np.transpose(env.observation_space.high, (2, 0, 1))
        self.observation_space = gymnasium.spaces.Box(low, high, dtype=np.uint8)
        self.action_space = env.action_space

    def reset(self, **kwargs: Any) -> tuple[Any, dict[str, Any]]:
        obs, info = self.env.reset(**kwargs)
        return obs.transpose(2, 0, 1), info

    def step(self, action: Any) -> tuple[Any, float, bool, bool, dict[str, Any]]:
        obs, reward, terminated, truncated, info = self.env.step(action)
        return obs.transpose(2, 0, 1), reward, terminated, truncated, info

    def __getattr__(self, name: str) -> Any:
        return getattr(self.env, name)


def _load() -> None:
    # each module registers itself
    from edge.envs import pixel_cartpole, pixel_pendulum, pixel_reacher  # noqa: F401
