"""ChunkedActions (training with action chunks) and the real-time loop playing chunks and
sending histories, all against sequences worked out by hand on exact ticks."""

from __future__ import annotations

from typing import Any

import gymnasium
import numpy as np
import pytest

from edge.realtime import Reply, Sent, run_realtime
from models.chunk_wrapper import ChunkedActions
from splitedge.realtime_spec import RealtimeSpec
from tests.test_delay_wrapper import Recorder, Scripted
from tests.test_realtime import DEFAULT, FakeClock, ScriptedPolicy, TickEnv

BOX = gymnasium.spaces.Box(-100.0, 100.0, (1,), np.float32)


def chunk_of(tick: int, h: int = 3) -> np.ndarray:
    """The chunk chosen at `tick`: 10 * tick + index, flattened as the agent's action."""
    return np.array([10 * tick + i for i in range(h)], np.float32)


def test_macro_actions_play_the_whole_chunk_and_sum_its_rewards() -> None:
    inner = Recorder(BOX, episode_len=4)
    env = ChunkedActions(inner, 3)
    assert env.action_space.shape == (3,)
    env.reset()
    _, reward, terminated, _, info = env.step(chunk_of(0))
    assert (reward, terminated, info["chunk_ticks"]) == (3.0, False, 3)
    _, reward, terminated, _, info = env.step(chunk_of(1))  # the episode ends after one tick
    assert (reward, terminated, info["chunk_ticks"]) == (1.0, True, 1)
    assert [float(a[0]) for a in inner.applied] == [0, 1, 2, 10]


def test_chunks_under_delay_are_played_as_the_device_plays_them() -> None:
    # chunk t arrives at t + d: c0@1 c1@1 c2@4 c3@4 c4@4 (by hand)
    inner = Recorder(BOX)
    env = ChunkedActions(inner, 3, Scripted([1, 0, 2, 1, 0], 2))
    env.reset()
    ages = [env.step(chunk_of(t))[4]["applied_action_age"] for t in range(5)]
    # tick 0: nothing yet (default 0); ticks 1-3: c1 (newer than c0) indices 0, 1, 2;
    # tick 4: c4, the newest of the three arriving then, index 0
    assert [float(a[0]) for a in inner.applied] == [0, 10, 11, 12, 40]
    assert ages == [None, 0, 1, 2, 0]


def test_chunk_refusals() -> None:
    with pytest.raises(ValueError, match="need Box"):
        ChunkedActions(Recorder(gymnasium.spaces.Discrete(2)), 3)
    with pytest.raises(ValueError, match="not longer than the longest delay"):
        ChunkedActions(Recorder(BOX), 2, Scripted([], 2))


class ChunkPolicy(ScriptedPolicy):
    """Answers the observation of tick j with the chunk [100 j, 100 j + 1, 100 j + 2]."""

    realtime = RealtimeSpec(chunk_length=3)

    def poll(self) -> list[Reply]:
        out = []
        for r in super().poll():
            chunk = [100 * r.action + i for i in range(3)]
            out.append(Reply(r.step, chunk[0], r.arrived, chunk=chunk))
        return out


@pytest.mark.parametrize(
    ("delays", "applied", "ages"),
    [
        ([1] * 5, [DEFAULT, 1, 101, 201, 301], [None, 1, 1, 1, 1]),
        # tick 1's reply lost: tick 2 plays index 2 of tick 0's chunk
        ([1, None, 1, 1, 1], [DEFAULT, 1, 2, 201, 301], [None, 1, 2, 1, 1]),
    ],
)
def test_the_loop_plays_chunks(delays: list[Any], applied: list[int], ages: list[Any]) -> None:
    clock, env = FakeClock(), TickEnv()
    result = run_realtime(ChunkPolicy(clock, delays), env, 0.25, 5, clock=clock)
    assert env.applied == applied and result.ages == ages


class HistoryPolicy(ScriptedPolicy):
    """Records the actions in flight it is sent (the action of tick j is j)."""

    realtime = RealtimeSpec(action_history=2)

    def __init__(self, clock: FakeClock, delays: list[Any]):
        super().__init__(clock, delays)
        self.histories: list[list[int]] = []

    def send(self, frame: Any, actions_in_flight: Any = None) -> Sent:
        self.histories.append(list(actions_in_flight))
        return super().send(frame)


@pytest.mark.parametrize(
    ("episode_len", "sent"),
    [
        # arrivals by hand: tick 0 @2, 1 @2, 2 @4, 3 @3 (right after its own send), 4 @5
        (100, [[DEFAULT, DEFAULT], [DEFAULT, DEFAULT], [0, 1], [1, 1], [2, 3]]),
        # a new episode at tick 3: earlier ticks are the default again
        (3, [[DEFAULT, DEFAULT], [DEFAULT, DEFAULT], [0, 1], [DEFAULT, DEFAULT], [DEFAULT, 3]]),
    ],
)
def test_the_loop_sends_what_the_device_knows(episode_len: int, sent: list[list[int]]) -> None:
    clock = FakeClock()
    policy = HistoryPolicy(clock, [2, 1, 2, 0, 1])
    run_realtime(policy, TickEnv(episode_len), 0.25, 5, clock=clock)
    assert policy.histories == sent


def test_real_time_rows_name_the_strategy() -> None:
    from deploy.realtime_report import COLUMNS, summarise

    clock = FakeClock()
    result = run_realtime(ChunkPolicy(clock, [1] * 4), TickEnv(), 0.25, 4, clock=clock)
    row = summarise([result.as_dict()])
    assert row["strategy"] == "chunk 3" and "strategy" in COLUMNS
    plain = run_realtime(ScriptedPolicy(clock, [1] * 4), TickEnv(), 0.25, 4, clock=clock)
    assert summarise([plain.as_dict()])["strategy"] == "hold"
