"""Per-step records of the closed loop and their summary (percentiles, bytes, fallbacks)."""

from __future__ import annotations

import os
import resource
from array import array
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np


@dataclass
class StepRecord:
    """One closed-loop step: timings in ms, gRPC message bytes each way."""

    step: int
    encode_ms: float
    rtt_ms: float
    server_queue_ms: float
    server_compute_ms: float
    total_ms: float
    bytes_up: int
    bytes_down: int
    fallback: bool
    reward: float = 0.0
    error: str = ""

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def percentile(values: Sequence[float], q: float) -> float:
    return (
        float(np.percentile(np.asarray(values, dtype=np.float64), q))
        if len(values)
        else float("nan")
    )


def _mean(xs: Sequence[float]) -> float:
    return float(np.mean(xs)) if len(xs) else float("nan")


def summarise(records: Sequence[StepRecord]) -> dict[str, float]:
    """p50/p95/p99 decision latency, mean parts, bytes per step each way, fallback count."""
    ok = [r for r in records if not r.fallback]
    total = [r.total_ms for r in ok]
    return {
        "steps": len(records),
        "p50_ms": percentile(total, 50),
        "p95_ms": percentile(total, 95),
        "p99_ms": percentile(total, 99),
        "encode_ms": _mean([r.encode_ms for r in ok]),
        "rtt_ms": _mean([r.rtt_ms for r in ok]),
        "server_queue_ms": _mean([r.server_queue_ms for r in ok]),
        "server_compute_ms": _mean([r.server_compute_ms for r in ok]),
        "bytes_up": _mean([r.bytes_up for r in ok]),
        "bytes_down": _mean([r.bytes_down for r in ok]),
        "fallbacks": len(records) - len(ok),
    }


def peak_rss_mb() -> float:
    """This process's peak resident set size in MB.

    On Linux this reads VmHWM from /proc: ru_maxrss survives execve, so a child forked
    from a big parent (a test runner with torch loaded) would report the parent's peak.
    """
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024.0
    except OSError:
        pass
    kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return kib / 1024.0 if os.uname().sysname == "Linux" else kib / 1024.0 / 1024.0


class WindowedLatency:
    """Decisions, fallbacks and p50/p95 latency per fixed time window, holding only the
    current window's latencies: a long soak's memory must not grow with its length, or
    the RSS it reports would be its own bookkeeping."""

    def __init__(self, window_s: float, windows: int):
        self.window_s, self.windows = window_s, windows
        self.done: list[dict[str, float]] = []
        self._index, self._lat, self._n, self._fell = 0, array("d"), 0, 0

    def add(self, t_s: float, total_ms: float, fallback: bool) -> None:
        """One decision that ended t_s seconds into the run."""
        index = min(int(t_s // self.window_s), self.windows - 1)
        while self._index < index:
            self._close((self._index + 1) * self.window_s)
        self._n += 1
        if fallback:
            self._fell += 1
        else:
            self._lat.append(total_ms)

    def finish(self, end_s: float) -> list[dict[str, float]]:
        """Close the remaining windows; the last one ends at end_s."""
        while self._index < self.windows - 1:
            self._close((self._index + 1) * self.window_s)
        self._close(max(end_s, self._index * self.window_s + 1e-9))
        return self.done

    def _close(self, to_s: float) -> None:
        lo = self._index * self.window_s
        self.done.append(
            {
                "from_s": lo,
                "to_s": to_s,
                "decisions": self._n,
                "decisions_s": self._n / (to_s - lo),
                "p50_ms": percentile(self._lat, 50),
                "p95_ms": percentile(self._lat, 95),
                "fallbacks": self._fell,
            }
        )
        self._index, self._lat, self._n, self._fell = self._index + 1, array("d"), 0, 0
