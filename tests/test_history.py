"""The device's action history (edge/history.py) and DelayedActions' "known" mode, which must
build the same lists: both against sequences worked out by hand."""

from __future__ import annotations

import gymnasium
import numpy as np
import pytest

from edge.history import ActionHistory, chunk_actions, history_tensor
from edge.wire import from_tensor, to_tensor
from models.delay_wrapper import IN_FLIGHT_KEY, DelayedActions
from splitedge.errors import SplitedgeError
from tests.test_delay_wrapper import Recorder, Scripted

D = -1  # the default action in the first test


def test_known_actions_else_the_held_one_else_the_default() -> None:
    h = ActionHistory(3, D)
    assert h.window(0, held=D) == [D, D, D]  # before the episode: the default
    h.chosen(0, 10)
    # tick 2: tick 0 known (10); tick 1 still in flight -> the held action (10)
    assert h.window(2, held=10) == [D, 10, 10]
    h.chosen(2, 12)  # tick 2's reply overtook tick 1's: ticks 1 and 3 hold 12
    assert h.window(4, held=12) == [12, 12, 12]
    h.chosen(1, 11)
    assert h.window(4, held=12) == [11, 12, 12]
    h.start_episode(5)
    assert h.window(6, held=D) == [D, D, D]  # ticks 3, 4 before the episode; 5 unknown


def test_wire_forms() -> None:
    t = history_tensor([1, 0, 1], {"type": "discrete", "n": 2}, 3)
    assert list(t.shape) == [3, 1] and from_tensor(t).tolist() == [[1], [0], [1]]
    box = {"type": "continuous", "shape": [2]}
    t = history_tensor([np.array([0.5, -1.0]), np.array([2.0, 0.0])], box, 2)
    assert list(t.shape) == [2, 2] and from_tensor(t).dtype == np.float32
    with pytest.raises(SplitedgeError, match="reads the last 3 actions in flight, got 2"):
        history_tensor([1, 0], {"type": "discrete", "n": 2}, 3)
    chunk = to_tensor(np.array([[0.1], [0.2]], np.float32))
    assert np.allclose(chunk_actions(chunk, box), [[0.1], [0.2]])
    assert chunk_actions(to_tensor(np.array([[2], [0]], np.int64)), {"type": "discrete"}) == [2, 0]


def action(tick: int) -> int:
    """The action chosen at a tick: 1, 2, 3, 1, ... (never the default 0)."""
    return tick % 3 + 1


def _flights(delays: list[int], max_ticks: int, steps: int, history: str) -> list[list[int]]:
    """The actions-in-flight list of every observation, as action numbers."""
    env = DelayedActions(
        Recorder(gymnasium.spaces.Discrete(4), dict_obs=True), Scripted(delays, max_ticks),
        history=history,
    )  # fmt: skip
    obs, _ = env.reset()
    out = []
    for t in range(steps):
        out.append([int(np.argmax(row)) for row in obs[IN_FLIGHT_KEY]])
        obs, *_ = env.step(action(t))
    out.append([int(np.argmax(row)) for row in obs[IN_FLIGHT_KEY]])
    return out


def test_known_mode_keeps_only_what_has_arrived() -> None:
    # actions 1, 2, 3, 1 chosen at ticks 0..3 with delays 2, 1, 1, 0: arrive at 2, 2, 3, 3
    delays, steps = [2, 1, 1, 0], 4
    assert _flights(delays, 2, steps, "chosen") == [[0, 0], [0, 1], [1, 2], [2, 3], [3, 1]]
    # tick 1: tick 0's action (due at 2) is not known yet: the held one, the default 0
    assert _flights(delays, 2, steps, "known") == [[0, 0], [0, 0], [1, 2], [2, 3], [3, 1]]
    # tick 2's action arriving at 4 instead: at tick 3 its slot holds tick 1's (held) action
    assert _flights([2, 1, 2, 0], 2, steps, "known") == [[0, 0], [0, 0], [1, 2], [2, 2], [3, 1]]


def test_device_history_builds_the_same_lists() -> None:
    """ActionHistory, fed the arrivals of the last case as the real-time loop collects them
    (before its send: replies to earlier ticks; after it: this tick's own), gives its lists."""
    arrivals = {0: 2, 1: 2, 2: 4, 3: 3}  # chosen tick -> arrival tick
    h, held, held_from, got = ActionHistory(2, 0), 0, -1, []

    def deliver(j: int) -> None:
        nonlocal held, held_from
        h.chosen(j, action(j))
        if j > held_from:
            held, held_from = action(j), j

    for k in range(5):
        for j in sorted(j for j, a in arrivals.items() if a == k and j < k):
            deliver(j)
        got.append(h.window(k, held))
        if arrivals.get(k) == k:
            deliver(k)
    assert got == _flights([2, 1, 2, 0], 2, 4, "known")


def test_history_mode_is_checked() -> None:
    with pytest.raises(ValueError, match="history must be one of"):
        DelayedActions(Recorder(gymnasium.spaces.Discrete(2)), Scripted([], 1), history="x")


def test_request_history_matches_the_head() -> None:
    from edge.history import request_history

    discrete = {"type": "discrete", "n": 2}
    assert request_history(None, discrete, 0) is None
    with pytest.raises(SplitedgeError, match="reads no actions in flight"):
        request_history([1], discrete, 0)
    with pytest.raises(SplitedgeError, match="needs the last 2 actions in flight"):
        request_history(None, discrete, 2)
    t = request_history([1, 0], discrete, 2)
    assert t is not None and from_tensor(t).tolist() == [[1], [0]]
