"""SerialLink on a virtual clock: FIFO serialisation, delay, jitter bounds, queue accounting."""

from __future__ import annotations

import pytest

from deploy.link.model import SerialLink

MS = 1e-3


def test_packets_queue_behind_each_other_at_the_line_rate() -> None:
    link = SerialLink(rate_kbit=1000, delay_ms=20)  # 1500 B take 12 ms at 1 Mbit/s
    t = 100.0
    finishes = [link.serialise(t, 1500) for _ in range(3)]
    assert finishes == pytest.approx([t + 12 * MS, t + 24 * MS, t + 36 * MS])
    assert link.arrival(finishes[-1]) == pytest.approx(t + 56 * MS)
    # An idle line starts at once; a later packet does not wait for a line that is free.
    assert link.serialise(t + 1.0, 125) == pytest.approx(t + 1.0 + 1 * MS)


def test_backlog_drains_at_the_rate_and_reopens_with_room_for_a_packet() -> None:
    link = SerialLink(rate_kbit=8000, delay_ms=5, queue_bytes=4096)  # 1 byte per us
    t = 10.0
    link.serialise(t, 4000)
    assert link.backlog_bytes(t) == pytest.approx(4000)
    assert link.backlog_bytes(t + 1000e-6) == pytest.approx(3000)
    assert link.backlog_bytes(t + 1.0) == 0
    assert link.is_full(t)  # 4096 - 4000 < one packet
    assert not link.is_full(t + 1500e-6)
    # Reopens when 4096 - 1500 = 2596 bytes remain: 4000 - 2596 = 1404 us after t.
    assert link.reopens_at() == pytest.approx(t + 1404e-6)
    assert link.read_budget(t + 1404e-6) == pytest.approx(1500, abs=1)
    assert link.read_budget(t + 1.0) == 4096
    assert link.peak_backlog == pytest.approx(4000)


def test_jitter_stays_within_its_bounds_and_is_seeded() -> None:
    a = SerialLink(rate_kbit=1000, delay_ms=10, jitter_ms=2, seed=3)
    b = SerialLink(rate_kbit=1000, delay_ms=10, jitter_ms=2, seed=3)
    draws = [a.arrival(0.0) for _ in range(2000)]
    assert draws == [b.arrival(0.0) for _ in range(2000)]
    assert min(draws) >= 8 * MS and max(draws) <= 12 * MS
    # Uniform on [8, 12] ms: mean 10 ms, and both ends are reached.
    assert sum(draws) / len(draws) == pytest.approx(10 * MS, abs=0.1 * MS)
    assert min(draws) < 8.1 * MS and max(draws) > 11.9 * MS


def test_unshaped_line_adds_delay_only() -> None:
    link = SerialLink(rate_kbit=None, delay_ms=7)
    assert link.serialise(1.0, 10**6) == 1.0
    assert link.backlog_bytes(1.0) == 0 and not link.is_full(1.0)
    assert link.arrival(1.0) == pytest.approx(1.0 + 7 * MS)
