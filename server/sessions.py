"""Sessions opened by Hello: which mode a client speaks, kept in a bounded LRU table."""

from __future__ import annotations

import secrets
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass, field

from server.errors import Kind, RequestError


@dataclass(frozen=True)
class Session:
    """One client's Hello: its id, whether it sends features (split) or frames (raw)."""

    id: int
    raw: bool
    client_id: str = ""
    opened: float = field(default_factory=time.time)


class Sessions:
    """Thread-safe session table; past `limit` the least recently used session is forgotten."""

    def __init__(self, limit: int = 10_000):
        self.limit = limit
        self._table: OrderedDict[int, Session] = OrderedDict()
        self._lock = threading.Lock()

    def open(self, raw: bool, client_id: str = "") -> Session:
        """A new session with a random nonzero id below 2**32 (a short varint; 0 means 'unset')."""
        with self._lock:
            while True:
                sid = secrets.randbelow(2**32 - 1) + 1
                if sid not in self._table:
                    break
            session = self._table[sid] = Session(sid, raw, client_id[:128])
            while len(self._table) > self.limit:
                self._table.popitem(last=False)
        return session

    def get(self, sid: int) -> Session:
        """The session with this id, or FAILED_PRECONDITION telling the client to Hello first."""
        with self._lock:
            session = self._table.get(sid)
            if session is None:
                raise RequestError(Kind.PRECONDITION, f"unknown session {sid}; call Hello first")
            self._table.move_to_end(sid)
        return session

    def __len__(self) -> int:
        return len(self._table)
