"""CartPole-v1 seen through stacked grayscale frames of its true state.

`cartpole-pixels` is the small 48x48 observation the shipped policy acts on;
`cartpole-camera` draws the same scene at 224x224, the size of a frame a camera
pipeline would hand over before any downsampling (what raw offload must send).
"""

from __future__ import annotations

from collections import deque
from typing import Any

import gymnasium as gym
import numpy as np

from edge.envs import register
from edge.envs.raster import Canvas

X_LIMIT = 2.4  # CartPole's termination bound; the frame spans [-X_LIMIT, X_LIMIT]


class PixelCartPole(gym.Wrapper):
    """CartPole-v1 whose observation is the last `stack` rasterised frames, uint8 (stack, H, W).

    The pole is drawn longer than to scale (0.5 of the frame height) so that the
    +-12 degree range the task cares about spans several pixels; edges are
    anti-aliased so sub-pixel motion changes pixel values.
    """

    def __init__(self, size: int = 48, stack: int = 3):
        super().__init__(gym.make("CartPole-v1"))
        self.size, self.stack = size, stack
        self.canvas = Canvas(size, size)
        self.frames: deque[np.ndarray] = deque(maxlen=stack)
        self.observation_space = gym.spaces.Box(0, 255, (stack, size, size), np.uint8)

    def _draw(self, state: np.ndarray) -> np.ndarray:
        x, _, theta, _ = (float(v) for v in state)
        s = self.size
        cx = (x / X_LIMIT * 0.5 + 0.5) * s
        cy = 0.75 * s
        pole = 0.5 * s
        c = self.canvas
        c.clear()
        c.box(cx, cy, half_w=0.06 * s, half_h=0.04 * s, value=0.6)
        # 1.2 px wide at 48 px; scaled with the frame so that every size shows the same scene
        half_width = 0.6 * (s / 48)
        c.segment(cx, cy, cx + pole * np.sin(theta), cy - pole * np.cos(theta), half_width)
        return c.to_uint8()

    def _obs(self) -> np.ndarray:
        return np.stack(self.frames, axis=0)

    def reset(self, **kwargs: Any) -> tuple[np.ndarray, dict[str, Any]]:
        state, info = self.env.reset(**kwargs)
        frame = self._draw(state)
        for _ in range(self.stack):
            self.frames.append(frame)
        return self._obs(), info

    def step(self, action: Any) -> tuple[np.ndarray, float, bool, bool, dict[str, Any]]:
        state, reward, terminated, truncated, info = self.env.step(
            int(np.asarray(action).reshape(-1)[0])
        )
        self.frames.append(self._draw(state))
        return self._obs(), float(reward), terminated, truncated, info


@register("cartpole-pixels")
def make(size: int = 48, stack: int = 3) -> PixelCartPole:
    return PixelCartPole(size=size, stack=stack)


CAMERA_SIZE = 224


@register("cartpole-camera")
def make_camera(size: int = CAMERA_SIZE, stack: int = 3) -> PixelCartPole:
    return PixelCartPole(size=size, stack=stack)
