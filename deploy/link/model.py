"""The link model shared by every connection in one direction: a FIFO serial line plus delay."""

from __future__ import annotations

import random
from collections import deque

from deploy.link.profiles import PACKET_BYTES

RECORD_MAX = 100_000


class SerialLink:
    """One direction of a link: bytes queue, serialise at rate_kbit, then fly for delay_ms +- jitter.

    Times are in seconds on the caller's monotonic clock. rate_kbit=None leaves the rate
    to someone else (a kernel qdisc), so only delay and jitter are applied here.
    """

    def __init__(
        self,
        rate_kbit: float | None,
        delay_ms: float,
        jitter_ms: float = 0.0,
        queue_bytes: int = 64 * 1024,
        seed: int = 0,
    ):
        self.bytes_per_s = None if rate_kbit is None else rate_kbit * 1000.0 / 8.0
        self.delay_s = delay_ms / 1000.0
        self.jitter_s = jitter_ms / 1000.0
        self.queue_bytes = queue_bytes
        self.free_at = 0.0  # when the line finishes serialising everything accepted so far
        self.peak_backlog = 0.0  # most bytes ever waiting to be serialised, right after a read
        self._rng = random.Random(seed)
        # One-way delay each packet was given after order-keeping (ms), for self-checks and
        # stats; the most recent RECORD_MAX only, so a long run stays small.
        self.applied_ms: deque[float] = deque(maxlen=RECORD_MAX)

    def serialise(self, now: float, nbytes: int) -> float:
        """Accept nbytes at time now behind what is queued; return when their last bit is sent."""
        start = max(now, self.free_at)
        finish = start if self.bytes_per_s is None else start + nbytes / self.bytes_per_s
        self.free_at = finish
        self.peak_backlog = max(self.peak_backlog, self.backlog_bytes(now))
        return finish

    def arrival(self, finish: float) -> float:
        """When a packet whose last bit left at finish reaches the far end (before reordering)."""
        jitter = self._rng.uniform(-self.jitter_s, self.jitter_s) if self.jitter_s else 0.0
        return finish + self.delay_s + jitter

    def backlog_bytes(self, now: float) -> float:
        """Bytes accepted but not yet serialised at time now."""
        if self.bytes_per_s is None:
            return 0.0
        return max(0.0, self.free_at - now) * self.bytes_per_s

    def read_budget(self, now: float) -> int:
        """How many bytes may be read now: the free queue space, but at least one packet."""
        return max(PACKET_BYTES, int(self.queue_bytes - self.backlog_bytes(now)))

    def is_full(self, now: float) -> bool:
        """Whether the sender must wait: less than one packet of queue space left."""
        return self.backlog_bytes(now) > self.queue_bytes - PACKET_BYTES

    def reopens_at(self) -> float:
        """When the backlog will have drained enough to accept a full packet again."""
        if self.bytes_per_s is None:
            return 0.0
        return self.free_at - max(0, self.queue_bytes - PACKET_BYTES) / self.bytes_per_s
