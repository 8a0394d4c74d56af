"""ChunkPlayer against hand-computed tick-by-tick sequences."""

from __future__ import annotations

import pytest

from edge.chunks import ChunkPlayer


def _play(player: ChunkPlayer, ticks: range, arrivals: dict[int, list[tuple[int, list[str]]]]):
    """(action, age) per tick, chunks received at the start of the tick they arrive on."""
    out = []
    for t in ticks:
        for obs_tick, chunk in arrivals.get(t, []):
            player.receive(obs_tick, chunk)
        out.append((player.play(t), player.age))
    return out


def test_chunk_plays_from_its_observation_tick_and_newer_replaces_the_rest() -> None:
    # chunk A answers tick 0's observation and arrives at tick 2 (2 ticks late): its actions
    # for ticks 0 and 1 are spent, tick 2 plays a2. Chunk B (observation tick 3) arrives at
    # tick 4 and replaces A from tick 4 on: b1, b2, b3; then nothing covers 7, 8: hold b3.
    arrivals = {
        2: [(0, ["a0", "a1", "a2", "a3", "a4", "a5"])],
        4: [(3, ["b0", "b1", "b2", "b3"])],
    }
    got = _play(ChunkPlayer("stop"), range(9), arrivals)
    assert got == [
        ("stop", None), ("stop", None),  # no chunk yet: the default action
        ("a2", 2), ("a3", 3),
        ("b1", 1), ("b2", 2), ("b3", 3),
        ("b3", 4), ("b3", 5),  # B ran out at tick 6: held, growing older
    ]  # fmt: skip


def test_older_chunk_arriving_late_is_ignored() -> None:
    # B (observation 2) overtakes A (observation 1) on the link; A arrives after it
    player = ChunkPlayer(0)
    assert player.receive(2, [20, 21, 22, 23])
    assert player.play(3) == 21 and player.age == 1
    assert not player.receive(1, [10, 11, 12, 13, 14])
    assert not player.receive(2, [90, 91, 92, 93])  # a duplicate of the held one
    assert [player.play(t) for t in (4, 5)] == [22, 23]


def test_chunk_that_ran_out_before_arriving_holds_the_last_action_played() -> None:
    # A (obs 0, 3 actions) plays a1 at tick 1; B (obs 2, 2 actions) only arrives at tick 6,
    # when it covers nothing any more (ticks 2, 3 are past): hold, from A's observation.
    got = _play(ChunkPlayer("d"), range(1, 8), {1: [(0, ["a0", "a1", "a2"])],
                                                 6: [(2, ["b0", "b1"])]})  # fmt: skip
    assert got == [("a1", 1), ("a2", 2), ("a2", 3), ("a2", 4), ("a2", 5), ("a2", 6), ("a2", 7)]


def test_reset_forgets_chunks_and_bad_input_is_refused() -> None:
    player = ChunkPlayer("d")
    player.receive(0, ["a0", "a1"])
    assert player.play(0) == "a0"
    player.reset()
    assert player.play(0) == "d" and player.age is None
    assert player.receive(0, ["x"])  # after a reset an observation tick 0 is new again
    with pytest.raises(ValueError, match="at least one action"):
        player.receive(1, [])
    with pytest.raises(ValueError, match="ticks count from 0"):
        player.receive(-1, ["x"])
    player.play(5)
    with pytest.raises(ValueError, match="before the last tick"):
        player.play(4)
