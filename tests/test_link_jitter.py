"""Jitter from the userspace delay stage, checked on the delays it applied (not wall clock)."""

from __future__ import annotations

import numpy as np

from deploy.link import jitter
from deploy.link.kernel import jitter_method
from deploy.link.model import SerialLink
from deploy.link.pipe import Stream


def test_applied_delays_follow_the_profile_distribution() -> None:
    rows = jitter.self_check(delay_ms=50.0, jitter_ms=20.0, packets=10_000)
    assert [r["quantile"] for r in rows] == ["p50", "p95"]
    for r in rows:
        assert r["packets"] == 10_000
        # the reference is the uniform distribution's quantile, computed here independently
        want = {"p50": 50.0, "p95": 50.0 - 20.0 + 40.0 * 0.95}[r["quantile"]]
        assert r["expected_ms"] == want
        assert abs(r["applied_ms"] - want) <= 2.0 and r["ok"], r  # 10% of the 20 ms spread


def test_back_to_back_packets_keep_their_order() -> None:
    clock = jitter._Clock()
    link = SerialLink(None, 30.0, 25.0, seed=3)
    stream = Stream(clock, link, lambda n: None)  # type: ignore[arg-type]
    for _ in range(2_000):
        stream.carry(b"y" * 100)
        clock.now += 0.0005  # far closer than the jitter: draws would reorder
    due = np.array([d for d, _ in stream.deliveries])
    assert np.all(np.diff(due) >= 0)  # never overtakes the packet ahead
    applied = np.array(link.applied_ms)
    assert applied.min() >= 30.0 - 25.0 - 1e-9
    # order-keeping only ever adds delay, so the median rises above the profile's
    assert np.median(applied) > 30.0


def test_output_says_which_jitter_ran() -> None:
    assert "userspace delay stage" in jitter_method("tbf")
    assert "netem" in jitter_method("netem")
