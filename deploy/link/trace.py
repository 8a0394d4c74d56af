"""Trace-driven link rates: Mahimahi packet-delivery traces or CSV time,kbit/s, replayed on tc.

Formats (detected per file):
- Mahimahi: one integer per line, a millisecond at which one 1500-byte packet may be
  delivered (several lines with the same ms = several packets); the trace loops at its end.
  It is turned into a rate per STEP_MS window: packets x 1500 x 8 bits / window.
- CSV: `time,kbit` rows (seconds from the start, kbit/s from then on), an optional header;
  the last row's rate holds until the trace loops at the last time + the step before it.
The kernel shaper (tbf, or netem's rate) is changed in place (`tc qdisc change`) at each
step by a thread, so a queue and the packets in it survive a rate change as on a real link.
A rate of 0 (an outage) is applied as FLOOR_KBIT: tc cannot take 0, and a stalled TCP
recovers the same way a few bits/s later.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from splitedge.errors import SplitedgeError

STEP_MS = 100
FLOOR_KBIT = 8.0
PACKET_BITS = 1500 * 8


@dataclass(frozen=True)
class Trace:
    """A rate schedule: rates[i] kbit/s holds from times[i] s; loops after period_s."""

    path: str
    times: tuple[float, ...]
    rates: tuple[float, ...]
    period_s: float

    @property
    def mean_kbit(self) -> float:
        """Time-weighted mean rate over one period."""
        ends = (*self.times[1:], self.period_s)
        total = sum(r * (e - t) for t, e, r in zip(self.times, ends, self.rates, strict=True))
        return total / self.period_s


def load_trace(path: str | Path) -> Trace:
    """Read a Mahimahi or CSV trace; one-line SplitedgeError naming the file and line if bad."""
    path = Path(path)
    try:
        lines = path.read_text().splitlines()
    except OSError as e:
        raise SplitedgeError(f"trace {path}: cannot read it ({e.strerror or e})") from None
    rows = [
        (i + 1, ln.strip()) for i, ln in enumerate(lines) if ln.strip() and not ln.startswith("#")
    ]
    if rows and not _numeric(rows[0][1].split(",")[0]):
        rows = rows[1:]  # a CSV header
    if not rows:
        raise SplitedgeError(f"trace {path} has no data; give Mahimahi ms lines or time,kbit rows")
    if "," in rows[0][1]:
        return _csv(path, rows)
    return _mahimahi(path, rows)


def _numeric(s: str) -> bool:
    try:
        float(s)
    except ValueError:
        return False
    return True


def _csv(path: Path, rows: list[tuple[int, str]]) -> Trace:
    times, rates = [], []
    for n, ln in rows:
        parts = ln.split(",")
        if len(parts) != 2 or not all(_numeric(p) for p in parts):
            raise SplitedgeError(f"trace {path} line {n}: expected time,kbit numbers, got {ln!r}")
        t, r = float(parts[0]), float(parts[1])
        if t < 0 or r < 0 or (times and t <= times[-1]):
            raise SplitedgeError(
                f"trace {path} line {n}: times must increase from >= 0 and rates be >= 0, got {ln!r}"
            )
        times.append(t)
        rates.append(r)
    step = times[-1] - times[-2] if len(times) > 1 else 1.0
    if not any(rates):
        raise SplitedgeError(f"trace {path}: every rate is 0; the link would never carry a byte")
    shift = times[0]
    return Trace(str(path), tuple(t - shift for t in times), tuple(rates), times[-1] - shift + step)


def _mahimahi(path: Path, rows: list[tuple[int, str]]) -> Trace:
    stamps = []
    for n, ln in rows:
        if not ln.isdigit():
            raise SplitedgeError(
                f"trace {path} line {n}: a Mahimahi trace has one whole ms per line, got {ln!r}"
            )
        ms = int(ln)
        if stamps and ms < stamps[-1]:
            raise SplitedgeError(
                f"trace {path} line {n}: ms go backwards ({ms} after {stamps[-1]})"
            )
        stamps.append(ms)
    period_ms = max(stamps[-1], STEP_MS)
    windows = [0] * -(-period_ms // STEP_MS)
    for ms in stamps:
        windows[min(ms // STEP_MS, len(windows) - 1)] += 1
    rates = tuple(c * PACKET_BITS / STEP_MS for c in windows)  # bits per ms = kbit/s
    times = tuple(i * STEP_MS / 1e3 for i in range(len(windows)))
    return Trace(str(path), times, rates, len(windows) * STEP_MS / 1e3)


class TraceDriver:
    """A thread that sets a direction's rate from a trace at each step, looping; counts changes."""

    def __init__(self, trace: Trace, set_rate: Callable[[float], None]) -> None:
        self.trace, self.set_rate = trace, set_rate
        self.changes = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def start(self) -> TraceDriver:
        self._thread.start()
        return self

    def _run(self) -> None:
        t0 = time.monotonic()
        last = None
        while not self._stop.is_set():
            at = (time.monotonic() - t0) % self.trace.period_s
            i = max(k for k, t in enumerate(self.trace.times) if t <= at)
            rate = max(FLOOR_KBIT, self.trace.rates[i])
            if rate != last:
                try:
                    self.set_rate(rate)
                except SplitedgeError:
                    return  # the link is being torn down
                self.changes += 1
                last = rate
            nxt = self.trace.times[i + 1] if i + 1 < len(self.trace.times) else self.trace.period_s
            self._stop.wait(max(0.001, nxt - at))

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(5)
