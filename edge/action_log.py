"""Record the actions a closed loop stepped its env with, to compare runs across devices.

Two devices that encode the same frames to the same features get the same actions from
the server, so the whole episode repeats step for step: the digest of the action sequence
is a one-line check that an arm64 device and an x86_64 one ran the same policy the same
way (a different feature changes an action sooner or later, and every frame after it).
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

import gymnasium
import numpy as np


def action_json(action: Any) -> str:
    """One action as compact JSON: an int for discrete, a list of floats for a Box."""
    a = np.asarray(action)
    value = a.item() if a.ndim == 0 else a.tolist()
    return json.dumps(value, separators=(",", ":"))


class ActionLog(gymnasium.Wrapper):
    """Passes every step through, keeping each action as a JSON line and a running sha256."""

    def __init__(self, env: gymnasium.Env):
        super().__init__(env)
        self.lines: list[str] = []
        self._sha = hashlib.sha256()

    def step(self, action: Any) -> Any:
        line = action_json(action)
        self.lines.append(line)
        self._sha.update(line.encode() + b"\n")
        return self.env.step(action)

    @property
    def digest(self) -> str:
        """sha256 of the action lines, each ending in a newline (what `write` saves)."""
        return self._sha.hexdigest()

    def write(self, path: Any) -> None:
        with open(path, "w") as f:
            f.writelines(line + "\n" for line in self.lines)
