"""What a delay-aware head is told about the actions in flight, as the device knows them.

A delay-aware bundle (policy.realtime.action_history D > 0) reads, beside the features of
tick k's observation, the actions chosen for the D observations before it (ticks k-D ..
k-1, oldest first). Over a slow link the device does not yet know every one of them:
a reply still on its way down holds the only copy. So the device sends, for each of
those ticks, the action chosen for it if its reply has arrived, else the action it holds
(the newest by observation tick that has arrived; the default action before any); ticks
before the episode began are the default action. models/delay_wrapper.py's
`history="known"` mode builds the same list in training, so the head sees in training
exactly what the device can send. In a loop that waits for every reply (act()) all of
them are known, and the list is simply the last D actions.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from edge.wire import from_tensor, to_tensor
from protos import policy_pb2 as pb
from splitedge.errors import SplitedgeError


class ActionHistory:
    """The last `length` actions chosen before a tick, as known on the device (see above)."""

    def __init__(self, length: int, default_action: Any):
        if length < 1:
            raise ValueError(f"an action history needs length >= 1, got {length}")
        self.length, self.default = length, default_action
        self.start_episode(0)

    def start_episode(self, tick: int) -> None:
        """A new episode begins at `tick`: earlier ticks count as the default action."""
        self._start = tick
        self._known: dict[int, Any] = {}

    def chosen(self, tick: int, action: Any) -> None:
        """The action chosen for the observation of `tick` (its reply arrived)."""
        if tick >= self._start:
            self._known[tick] = action

    def window(self, tick: int, held: Any) -> list[Any]:
        """The actions for ticks tick-length .. tick-1: known ones, else `held`."""
        for old in [t for t in self._known if t < tick - self.length]:
            del self._known[old]  # keeps the dict at most `length` entries past the window
        return [
            self.default if j < self._start else self._known.get(j, held)
            for j in range(tick - self.length, tick)
        ]


def history_tensor(actions: Sequence[Any], action: dict[str, Any], length: int) -> pb.Tensor:
    """`length` actions as ActRequest.actions_in_flight: [D, 1] INT64 for a discrete
    action space, [D, *shape] FLOAT32 for a continuous one; refuses a wrong count in one line."""
    if len(actions) != length:
        raise SplitedgeError(
            f"the bundle's head reads the last {length} actions in flight, got {len(actions)}"
        )
    if action["type"] == "discrete":
        a = np.asarray([int(np.asarray(x).reshape(-1)[0]) for x in actions], "<i8")
        return to_tensor(a.reshape(length, 1))
    shape = [int(d) for d in action.get("shape", [1])]
    return to_tensor(np.asarray(actions, "<f4").reshape(length, *shape))


def request_history(
    actions: Sequence[Any] | None, action: dict[str, Any], length: int
) -> pb.Tensor | None:
    """ActRequest.actions_in_flight for a head that reads `length` actions (None at 0);
    refuses actions given to a head that reads none, or none given to one that does."""
    if not length:
        if actions:
            raise SplitedgeError("this bundle's head reads no actions in flight")
        return None
    if actions is None:
        raise SplitedgeError(f"this bundle's head needs the last {length} actions in flight")
    return history_tensor(actions, action, length)


def chunk_actions(chunk: pb.Tensor, action: dict[str, Any]) -> list[Any]:
    """ActReply.chunk as a list of H actions (ints for discrete, float32 arrays otherwise)."""
    a = from_tensor(chunk)
    if action["type"] == "discrete":
        return [int(x) for x in a.reshape(-1)]
    return [row.astype(np.float32) for row in a]
