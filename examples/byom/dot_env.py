"""A user's own env, outside splitedge: steer a cursor onto a dot that drifts around.

Observations are 2 x 40 x 56 uint8 images (channel 0: the dot, channel 1: the cursor).
Actions are Discrete(5) (stay, up, down, left, right) or, with continuous=True, a Box
(dx, dy) in [-1, 1]. Reward: minus the cursor's distance to the dot, in units of the width.
"""

import gymnasium as gym
import numpy as np

H, W, SPEED, STEPS = 40, 56, 2.0, 100
MOVES = np.array([[0, 0], [-1, 0], [1, 0], [0, -1], [0, 1]], np.float64)


class DotTrack(gym.Env):
    def __init__(self, continuous: bool = False):
        self.observation_space = gym.spaces.Box(0, 255, (2, H, W), np.uint8)
        self.continuous = continuous
        if continuous:
            self.action_space = gym.spaces.Box(-1.0, 1.0, (2,), np.float32)
        else:
            self.action_space = gym.spaces.Discrete(5)

    def _obs(self) -> np.ndarray:
        img = np.zeros((2, H, W), np.uint8)
        for ch, (y, x) in enumerate((self.dot, self.cursor)):
            y0, x0 = int(np.clip(y, 1, H - 2)), int(np.clip(x, 1, W - 2))
            img[ch, y0 - 1 : y0 + 2, x0 - 1 : x0 + 2] = 255
        return img

    def reset(self, *, seed=None, options=None):
        super().reset(seed=seed)
        self.dot = self.np_random.uniform([2, 2], [H - 2, W - 2])
        self.cursor = self.np_random.uniform([2, 2], [H - 2, W - 2])
        self.drift = self.np_random.normal(0, 0.5, 2)
        self.t = 0
        return self._obs(), {}

    def step(self, action):
        move = np.clip(action, -1, 1) if self.continuous else MOVES[int(action)]
        self.cursor = np.clip(self.cursor + SPEED * np.asarray(move, np.float64), 1, [H - 2, W - 2])
        self.drift = np.clip(self.drift + self.np_random.normal(0, 0.2, 2), -1, 1)
        self.dot = np.clip(self.dot + self.drift, 1, [H - 2, W - 2])
        self.t += 1
        reward = -float(np.linalg.norm(self.dot - self.cursor)) / W
        return self._obs(), reward, False, self.t >= STEPS, {}
