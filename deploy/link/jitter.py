"""Self-check of the userspace delay stage's jitter, on the delays it applied (not wall clock).

Where netem is absent, jitter on the kernel path comes from the userspace delay stage (the
edge-namespace emulator with its rate shaping off, deploy/link/pipe.py): each packet gets
delay_ms + a draw from the profile's distribution, uniform in [-jitter_ms, +jitter_ms]
(netem's default without a table), and never overtakes the packet ahead of it, because a
link delivers a TCP stream in order. The stage records the delay each packet was given
(SerialLink.applied_ms). The check feeds it packets on a simulated clock, spaced wider
than the jitter so order-keeping never binds, and compares the recorded median and p95
with the distribution's: delay_ms and delay_ms + 0.9 x jitter_ms, to within 10% of jitter_ms.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from deploy.link.model import SerialLink
from deploy.link.pipe import Stream


class _Clock:
    """Just enough of an asyncio loop for Stream: a settable time, timers never fired."""

    def __init__(self) -> None:
        self.now = 0.0

    def time(self) -> float:
        return self.now

    def call_at(self, when: float, callback: Any, *args: Any) -> Any:
        return _Handle()


class _Handle:
    def cancel(self) -> None:
        pass


def expected(delay_ms: float, jitter_ms: float, q: float) -> float:
    """Quantile q of the profile's one-way delay: uniform on [delay - jitter, delay + jitter]."""
    return delay_ms - jitter_ms + 2 * jitter_ms * q


def self_check(
    delay_ms: float = 50.0, jitter_ms: float = 20.0, packets: int = 10_000, seed: int = 0
) -> list[dict[str, Any]]:
    """Rows (quantile, expected_ms, applied_ms, ok) for the median and p95 of applied delays."""
    clock = _Clock()
    link = SerialLink(None, delay_ms, jitter_ms, seed=seed)
    stream = Stream(clock, link, lambda n: None)  # type: ignore[arg-type]
    gap_s = (2 * jitter_ms + 1) / 1e3  # wider than the jitter: order-keeping never binds
    for _ in range(packets):
        stream.carry(b"x" * 100)
        clock.now += gap_s
    applied = np.array(link.applied_ms)
    rows = []
    for name, q in (("p50", 0.5), ("p95", 0.95)):
        want, got = expected(delay_ms, jitter_ms, q), float(np.quantile(applied, q))
        rows.append({
            "quantile": name, "packets": len(applied), "expected_ms": want, "applied_ms": got,
            "ok": abs(got - want) <= 0.1 * jitter_ms,  # 10% of the spread, stricter than of want
        })  # fmt: skip
    return rows
