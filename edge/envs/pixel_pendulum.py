"""Pendulum-v1 (swing-up, continuous torque) seen through stacked grayscale frames of its true state."""

from __future__ import annotations

from typing import Any

import gymnasium as gym
import numpy as np

from edge.envs import register
from edge.envs.frames import FrameStack
from edge.envs.raster import Canvas


class PixelPendulum(gym.Wrapper):
    """Pendulum-v1 whose observation is the last `stack` frames of the rod, uint8 (stack, H, W).

    The frame is drawn from the simulator's angle theta (0 = upright), so it shows exactly
    the angle the state vector's (cos, sin) encodes; the angular velocity the state also
    carries is recoverable only from the difference of stacked frames (at most 0.4 rad per
    step, a few pixels at the tip), as from a camera. A dot marks the pivot.
    """

    def __init__(self, size: int = 40, stack: int = 2):
        super().__init__(gym.make("Pendulum-v1"))
        self.size = size
        self.canvas = Canvas(size, size)
        self.stacked = FrameStack(stack)
        self.observation_space = gym.spaces.Box(0, 255, (stack, size, size), np.uint8)

    def _draw(self) -> np.ndarray:
        theta = float(self.env.unwrapped.state[0])  # type: ignore[attr-defined]
        s = self.size
        c = self.canvas
        c.clear()
        cx = cy = 0.5 * s
        rod = 0.42 * s
        c.segment(cx, cy, cx + rod * np.sin(theta), cy - rod * np.cos(theta), half_width=0.05 * s)
        c.box(cx, cy, half_w=0.04 * s, half_h=0.04 * s, value=0.5)
        return c.to_uint8()

    def reset(self, **kwargs: Any) -> tuple[np.ndarray, dict[str, Any]]:
        _, info = self.env.reset(**kwargs)
        return self.stacked.reset(self._draw()), info

    def step(self, action: Any) -> tuple[np.ndarray, float, bool, bool, dict[str, Any]]:
        _, reward, terminated, truncated, info = self.env.step(
            np.asarray(action, np.float32).reshape(1)
        )
        return self.stacked.push(self._draw()), float(reward), terminated, truncated, info


@register("pendulum-pixels")
def make(size: int = 40, stack: int = 2) -> PixelPendulum:
    return PixelPendulum(size=size, stack=stack)
