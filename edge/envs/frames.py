"""A fixed-length stack of rasterised frames: the pixel tasks' observation (stack, H, W) uint8."""

from __future__ import annotations

from collections import deque

import numpy as np


class FrameStack:
    """The last `stack` frames, oldest first; a reset fills it with copies of the first frame."""

    def __init__(self, stack: int):
        self.stack = stack
        self.frames: deque[np.ndarray] = deque(maxlen=stack)

    def reset(self, frame: np.ndarray) -> np.ndarray:
        """Start an episode: every slot holds `frame` (no motion is visible before the first step)."""
        for _ in range(self.stack):
            self.frames.append(frame)
        return self.observation()

    def push(self, frame: np.ndarray) -> np.ndarray:
        """Append the newest frame and return the stacked observation."""
        self.frames.append(frame)
        return self.observation()

    def observation(self) -> np.ndarray:
        """The stack as one uint8 array (stack, H, W)."""
        return np.stack(self.frames, axis=0)
