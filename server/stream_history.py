"""The actions in flight as the server chose them: one record per stream (issue 17).

A delay-aware head reads, next to an observation's features, the actions chosen for the
D ticks before it. Over a slow link the device does not know the ones whose replies are
still on their way down (edge/history.py), but the server answered them. A bundle with
`history_source: "server"` (splitedge/realtime_spec.py) lets the device leave
ActRequest.actions_in_flight unset on a stream and send the observation's `tick` (1 for
an episode's first) and `episode` instead; the server fills the history from its record
of its own answers on that stream, exactly as training saw it (models/delay_wrapper.py's
"chosen" history):

- ticks before the episode's first: the default action (0; for continuous actions
  zeros clipped into the bounds, the device's own fallback before any reply);
- a tick the server answered in this episode: that answer;
- a tick it never saw (the device sent nothing then): the answer before it, the action
  the device was holding, or the default when there is none.

A new episode number starts a fresh record. A stream is one connection to one replica, so
the record needs no sharing; it holds at most D + 2 answers. One record per stream: a
device that reconnects starts afresh, and its first D ticks then read the default.
"""

from __future__ import annotations

import numpy as np

from server.models import PolicyModels


def default_action(models: PolicyModels) -> np.ndarray:
    """The history's value for ticks before the episode, in the head's history dtype and shape."""
    spec = models.history
    assert spec is not None, "a server-kept history is for delay-aware heads"
    shape = spec.shape[1:]
    if models.action_type == "discrete":
        return np.zeros(shape, np.int64)
    action = models.bundle.policy["action"]
    a = np.zeros(shape, np.float32)
    if "low" in action and "high" in action:
        low = np.asarray(action["low"], np.float32).reshape(shape)
        high = np.asarray(action["high"], np.float32).reshape(shape)
        a = np.clip(a, low, high)
    return a


class StreamHistory:
    """One stream's record of the server's answers by (episode, tick); see the module doc."""

    def __init__(self, depth: int, default: np.ndarray):
        if depth < 1:
            raise ValueError(f"a history needs depth >= 1, got {depth}")
        self.depth, self.default = depth, default
        self.episode: int | None = None
        self._answers: dict[int, np.ndarray] = {}

    def window(self, episode: int, tick: int) -> np.ndarray:
        """The actions chosen for ticks tick-D .. tick-1 of `episode`, oldest first (D, ...)."""
        if episode != self.episode:
            self.episode, self._answers = episode, {}
        known = sorted(self._answers)
        rows, i, held = [], 0, self.default
        for j in range(tick - self.depth, tick):
            while i < len(known) and known[i] <= j:
                held = self._answers[known[i]]
                i += 1
            rows.append(self.default if j < 1 else held)
        return np.stack(rows)

    def answered(self, episode: int, tick: int, action: np.ndarray) -> None:
        """Record the server's answer to `tick` of `episode` (a later episode starts afresh)."""
        if episode != self.episode:
            self.episode, self._answers = episode, {}
        self._answers[tick] = np.asarray(action, self.default.dtype).reshape(self.default.shape)
        newest = max(self._answers)
        old = sorted(t for t in self._answers if t < newest - self.depth)
        for t in old[:-1]:  # the newest of those below the window still fills its gaps
            del self._answers[t]

    def __len__(self) -> int:
        return len(self._answers)


def stream_history(models: PolicyModels) -> StreamHistory | None:
    """A fresh record for one stream of a server-history bundle (None for any other bundle)."""
    if not models.realtime.server_history:
        return None
    return StreamHistory(models.realtime.action_history, default_action(models))
