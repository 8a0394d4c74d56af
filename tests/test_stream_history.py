"""The server's record of its own answers per stream (server/stream_history.py), against
histories worked out by hand."""

from __future__ import annotations

import numpy as np
import pytest

from server.stream_history import StreamHistory


def _window(h: StreamHistory, episode: int, tick: int) -> list[float]:
    return [float(x) for x in h.window(episode, tick).reshape(-1)]


def test_window_is_the_answers_before_the_tick_default_before_the_episode() -> None:
    h = StreamHistory(3, np.zeros(1, np.float32))
    assert _window(h, 1, 1) == [0.0, 0.0, 0.0]
    h.answered(1, 1, np.array([1.5]))
    assert _window(h, 1, 2) == [0.0, 0.0, 1.5]
    h.answered(1, 2, np.array([2.5]))
    h.answered(1, 3, np.array([3.5]))
    assert _window(h, 1, 4) == [1.5, 2.5, 3.5]
    h.answered(1, 4, np.array([4.5]))
    # tick 5 never sent: the device held tick 4's answer, so 5 reads 4.5
    h.answered(1, 6, np.array([6.5]))
    assert _window(h, 1, 7) == [4.5, 4.5, 6.5]


def test_a_new_episode_starts_afresh_and_the_record_stays_small() -> None:
    h = StreamHistory(2, np.zeros(1, np.float32))
    for t in range(1, 50):
        h.answered(1, t, np.array([float(t)]))
        assert len(h) <= 2 + 2
    assert _window(h, 1, 50) == [48.0, 49.0]
    assert _window(h, 1, 60) == [49.0, 49.0]  # a long gap holds the newest answer
    assert _window(h, 2, 2) == [0.0, 0.0] and len(h) == 0  # episode 2: nothing yet
    h.answered(2, 1, np.array([7.0]))
    assert _window(h, 2, 2) == [0.0, 7.0]


def test_discrete_answers_keep_their_dtype_and_shape() -> None:
    h = StreamHistory(2, np.zeros(1, np.int64))
    h.answered(5, 1, np.int64(3))
    w = h.window(5, 3)
    assert w.dtype == np.int64 and w.shape == (2, 1) and w.reshape(-1).tolist() == [3, 3]
    with pytest.raises(ValueError, match="depth >= 1"):
        StreamHistory(0, np.zeros(1, np.int64))
