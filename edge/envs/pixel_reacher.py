"""A planar two-link reacher (continuous joint-velocity control) seen through grayscale frames.

Gymnasium's Reacher-v5 needs MuJoCo, which these machines cannot install, so this is a
numpy task with Reacher-v5's geometry (links 0.1 and 0.11 m, target uniform in the disc
of radius 0.2 m, 50-step episodes) and first-order joints: the action sets each joint's
angular velocity. The state is (q1, q2, target); one frame shows all of it (arm and
target at different grey levels), so a single frame is a Markov observation.
"""

from __future__ import annotations

from typing import Any

import gymnasium as gym
import numpy as np

from edge.envs import register
from edge.envs.frames import FrameStack
from edge.envs.raster import Canvas

LINKS = (0.1, 0.11)  # metres, as Reacher-v5
REACH = LINKS[0] + LINKS[1]
TARGET_RADIUS = 0.2
MAX_JOINT_STEP = 0.25  # rad per step at |action| = 1
EPISODE_STEPS = 50
CONTROL_COST = 0.1


class ReacherEnv(gym.Env[np.ndarray, np.ndarray]):
    """Move the fingertip onto the target; reward = -distance/reach - 0.1 * mean(action^2)."""

    def __init__(self, size: int = 40, stack: int = 1):
        self.size = size
        self.canvas = Canvas(size, size)
        self.stacked = FrameStack(stack)
        self.observation_space = gym.spaces.Box(0, 255, (stack, size, size), np.uint8)
        self.action_space = gym.spaces.Box(-1.0, 1.0, (2,), np.float32)
        self.joints = np.zeros(2)
        self.target = np.zeros(2)
        self.steps = 0

    def fingertip(self) -> np.ndarray:
        """Fingertip position (m) from the joint angles (forward kinematics)."""
        q1, q2 = self.joints
        elbow = LINKS[0] * np.array([np.cos(q1), np.sin(q1)])
        return elbow + LINKS[1] * np.array([np.cos(q1 + q2), np.sin(q1 + q2)])

    def _px(self, p: np.ndarray) -> tuple[float, float]:
        """Metres to pixel coordinates; the frame spans [-reach, reach] with y up."""
        half = 0.5 * self.size
        scale = half / (REACH * 1.05)
        return half + float(p[0]) * scale, half - float(p[1]) * scale

    def _draw(self) -> np.ndarray:
        c, s = self.canvas, self.size
        c.clear()
        q1 = self.joints[0]
        base = self._px(np.zeros(2))
        elbow = self._px(LINKS[0] * np.array([np.cos(q1), np.sin(q1)]))
        tip = self._px(self.fingertip())
        c.segment(*base, *elbow, half_width=0.03 * s, value=0.5)
        c.segment(*elbow, *tip, half_width=0.03 * s, value=0.5)
        tx, ty = self._px(self.target)
        c.segment(tx, ty, tx, ty, half_width=0.045 * s, value=1.0)
        return c.to_uint8()

    def _distance(self) -> float:
        return float(np.linalg.norm(self.fingertip() - self.target))

    def reset(
        self, *, seed: int | None = None, options: dict[str, Any] | None = None
    ) -> tuple[np.ndarray, dict[str, Any]]:
        super().reset(seed=seed)
        rng = self.np_random
        self.joints = rng.uniform(-np.pi, np.pi, 2)
        while True:  # Reacher-v5's rejection sampling of the target
            self.target = rng.uniform(-TARGET_RADIUS, TARGET_RADIUS, 2)
            if np.linalg.norm(self.target) < TARGET_RADIUS:
                break
        self.steps = 0
        return self.stacked.reset(self._draw()), {"distance": self._distance()}

    def step(self, action: Any) -> tuple[np.ndarray, float, bool, bool, dict[str, Any]]:
        a = np.clip(np.asarray(action, np.float64).reshape(2), -1.0, 1.0)
        self.joints = self.joints + MAX_JOINT_STEP * a
        self.steps += 1
        dist = self._distance()
        reward = -dist / REACH - CONTROL_COST * float(np.mean(a * a))
        truncated = self.steps >= EPISODE_STEPS
        return self.stacked.push(self._draw()), reward, False, truncated, {"distance": dist}


@register("reacher-pixels")
def make(size: int = 40, stack: int = 1) -> ReacherEnv:
    return ReacherEnv(size=size, stack=stack)
