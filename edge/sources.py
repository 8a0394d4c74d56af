"""Frame sources for the device service: a camera (OpenCV / V4L2), a video file, or a gymnasium env.

Each source yields uint8 frames shaped like the bundle's observation (C, H, W).
Camera and video frames (BGR, any size) are resized and either kept as RGB
channels or turned to grayscale and stacked over the last C frames, which is
how the pixel tasks build their observations (`channels = "gray-stack"`).
A source that cannot start raises ConfigError, which the service turns into one
clear line and the exit status that tells systemd not to restart it.
"""

from __future__ import annotations

from collections import deque
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from splitedge.errors import SplitedgeError

CHANNEL_MODES = ("rgb", "gray", "gray-stack")


class ConfigError(SplitedgeError):
    """The service cannot start with this configuration (retrying will not help)."""


class Source(Protocol):
    """Where observations come from."""

    name: str

    def read(self) -> np.ndarray | None:
        """The next uint8 (C, H, W) observation, or None when the source has ended."""
        ...

    def feedback(self, action: Any) -> None:
        """Tell the source which action was taken (closed-loop sources step on it)."""
        ...

    def close(self) -> None: ...


def _cv2() -> Any:
    try:
        import cv2
    except ImportError as e:
        raise ConfigError(
            "camera and video sources need OpenCV: pip install opencv-python-headless "
            "into the device runtime, or use source kind 'env'"
        ) from e
    return cv2


class FrameShaper:
    """BGR frames of any size -> uint8 (C, H, W) observations."""

    def __init__(self, shape: tuple[int, ...], channels: str | None = None):
        if len(shape) != 3:
            raise ConfigError(
                f"camera/video sources need a (C, H, W) observation, the bundle has {shape}"
            )
        self.c, self.h, self.w = shape
        self.mode = channels or ("rgb" if self.c == 3 else "gray-stack")
        if self.mode not in CHANNEL_MODES:
            raise ConfigError(
                f"source channels {self.mode!r} is not one of {', '.join(CHANNEL_MODES)}"
            )
        if self.mode == "rgb" and self.c != 3 or self.mode == "gray" and self.c != 1:
            raise ConfigError(
                f"source channels {self.mode!r} does not fit the bundle's {self.c} channels"
            )
        self.stack: deque[np.ndarray] = deque(maxlen=self.c)

    def __call__(self, bgr: np.ndarray) -> np.ndarray:
        cv2 = _cv2()
        small = cv2.resize(bgr, (self.w, self.h), interpolation=cv2.INTER_AREA)  # (H, W, 3)
        if self.mode == "rgb":
            return np.ascontiguousarray(small[:, :, ::-1].transpose(2, 0, 1))  # (3, H, W)
        gray = cv2.cvtColor(small, cv2.COLOR_BGR2GRAY) if small.ndim == 3 else small  # (H, W)
        if self.mode == "gray":
            return gray[None].copy()
        while len(self.stack) < self.c - 1:  # first frame: repeat it, as the tasks' reset does
            self.stack.append(gray)
        self.stack.append(gray)
        return np.stack(self.stack, axis=0)


class CaptureSource:
    """cv2.VideoCapture on a camera (V4L2 device path or index) or a video file."""

    def __init__(self, kind: str, target: str | int, shaper: FrameShaper, loop: bool = False):
        cv2 = _cv2()
        self.name, self.loop, self.shaper = f"{kind}:{target}", loop, shaper
        if kind == "camera":
            if isinstance(target, str) and not Path(target).exists():
                raise ConfigError(
                    f"camera {target} not found: is it connected and enabled? "
                    "(`ls /dev/video*`; on a Pi with libcamera, use the V4L2 compatibility device)"
                )
            self.cap = (
                cv2.VideoCapture(target, cv2.CAP_V4L2)
                if isinstance(target, str)
                else cv2.VideoCapture(target)
            )
        else:
            if not Path(str(target)).is_file():
                raise ConfigError(f"video file {target} not found")
            self.cap = cv2.VideoCapture(str(target))
        ok, first = self.cap.read() if self.cap.isOpened() else (False, None)
        if not ok:
            self.cap.release()
            raise ConfigError(
                f"{self.name} opened but gave no frame: check permissions (group 'video') "
                "and that no other process holds it"
                if kind == "camera"
                else f"{self.name} could not be decoded by OpenCV"
            )
        self._pending: np.ndarray | None = first

    def read(self) -> np.ndarray | None:
        if self._pending is not None:
            frame, self._pending = self._pending, None
            return self.shaper(frame)
        ok, frame = self.cap.read()
        if not ok and self.loop:
            self.cap.set(_cv2().CAP_PROP_POS_FRAMES, 0)
            ok, frame = self.cap.read()
        return self.shaper(frame) if ok else None

    def feedback(self, action: Any) -> None:
        pass

    def close(self) -> None:
        self.cap.release()


class EnvSource:
    """A gymnasium env, closed loop: each action steps the env (benchmarks, emulated devices).

    `env`: one of our tasks, a gymnasium id or a user's package.module:ClassName (installed
    in the device's venv, e.g. by `splitedge flash --env-package`); None: the bundle's own.
    """

    def __init__(
        self,
        policy: dict[str, Any],
        env: str | None = None,
        env_kwargs: dict[str, Any] | None = None,
        seed: int = 0,
    ):
        from edge.envs import make_policy_env, policy_env_spec

        self.name = f"env:{policy_env_spec(policy, env, env_kwargs)[0]}"
        self.env = make_policy_env(policy, env, env_kwargs, seed=seed)
        self.seed, self.episodes, self.episode_return = seed, 0, 0.0
        self.returns: list[float] = []
        self.obs, _ = self.env.reset(seed=seed)

    def read(self) -> np.ndarray | None:
        return np.asarray(self.obs)

    def feedback(self, action: Any) -> None:
        self.obs, reward, terminated, truncated, _ = self.env.step(action)
        self.episode_return += float(reward)
        if terminated or truncated:
            self.returns.append(self.episode_return)
            self.episodes += 1
            self.episode_return = 0.0
            self.obs, _ = self.env.reset(seed=self.seed + self.episodes)

    def close(self) -> None:
        self.env.close()


def open_source(cfg: dict[str, Any], policy: dict[str, Any]) -> Source:
    """A source from the service config's [source] table, for a bundle's policy manifest.

    Kind "env" takes `env` (id or entry point; `task` in releases flashed before it) and
    `env_kwargs`; without them, the env the bundle records.
    """
    kind = cfg.get("kind", "env")
    shape = tuple(int(s) for s in policy["observation"]["shape"])
    if kind == "env":
        kwargs = cfg.get("env_kwargs")
        if kwargs is not None and not isinstance(kwargs, dict):
            raise ConfigError(
                f"source.env_kwargs must be a table of keyword arguments, got {kwargs!r}"
            )
        env = cfg.get("env") or cfg.get("task")
        if not env and not ((policy.get("env") or {}).get("id") or policy.get("task")):
            raise ConfigError(
                "source kind 'env' needs an env (the bundle names none): flash with "
                "--source env:ID_OR_ENTRY_POINT, or set source.env"
            )
        try:
            return EnvSource(policy, env, kwargs, seed=int(cfg.get("seed", 0)))
        except ConfigError:
            raise
        except SplitedgeError as e:  # unimportable, wrong shape: a restart will not fix it
            raise ConfigError(f"source kind 'env': {e}") from e
    if kind == "camera":
        device = cfg.get("device", "/dev/video0")
        target = int(device) if isinstance(device, int) or str(device).isdigit() else str(device)
        return CaptureSource("camera", target, FrameShaper(shape, cfg.get("channels")))
    if kind == "video":
        if "path" not in cfg:
            raise ConfigError("source kind 'video' needs source.path")
        return CaptureSource(
            "video",
            str(cfg["path"]),
            FrameShaper(shape, cfg.get("channels")),
            loop=bool(cfg.get("loop", True)),
        )
    raise ConfigError(f"source kind {kind!r} is not one of camera, video, env")
