"""Per-step records of the closed loop and their summary (percentiles, bytes, fallbacks)."""

from __future__ import annotations

import os
import resource
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
