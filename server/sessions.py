"""Sessions opened by Hello, with ids any replica of the same bundle can verify.

A session id carries its mode and a short tag keyed by the bundle's identity:

    id = nonce (20 bits) | raw (1 bit) | tag (14 bits)        # < 2**35: a 5-byte varint

so replicas behind round-robin load balancing need no shared state: a client that said
Hello to one replica may Act on another. The tag is not a credential (anyone with the
bundle can compute it; tokens and TLS are the access control); it catches ids that no
server of this bundle issued: a client that skipped Hello, or one that still holds an id
from before a rolling upgrade to another bundle version, gets FAILED_PRECONDITION and says
Hello again, which re-checks its encoder against the new bundle.
"""

from __future__ import annotations

import hashlib
import secrets
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass, field

from server.errors import Kind, RequestError

NONCE_BITS, TAG_BITS = 20, 14
MAX_ID = 1 << (NONCE_BITS + 1 + TAG_BITS)


@dataclass(frozen=True)
class Session:
    """One client's Hello: its id, whether it sends features (split) or frames (raw)."""

    id: int
    raw: bool
    client_id: str = ""
    opened: float = field(default_factory=time.time)


def bundle_key(name: str, version: str, encoder_digest: str) -> bytes:
    """The tag key of one bundle: replicas serving the same bundle share it."""
    return hashlib.sha256(f"{name}\0{version}\0{encoder_digest}".encode()).digest()


class SessionIds:
    """Make and check self-verifying session ids for one bundle key."""

    def __init__(self, key: bytes):
        self._key = key

    def _tag(self, nonce: int, raw: bool) -> int:
        msg = ((nonce << 1) | raw).to_bytes(3, "big")
        digest = hashlib.blake2s(msg, key=self._key, digest_size=4).digest()
        return int.from_bytes(digest, "big") & ((1 << TAG_BITS) - 1)

    def make(self, raw: bool) -> int:
        """A fresh nonzero id for a session in this mode."""
        while True:
            nonce = secrets.randbits(NONCE_BITS)
            sid = (((nonce << 1) | raw) << TAG_BITS) | self._tag(nonce, raw)
            if sid:
                return sid

    def mode(self, sid: int) -> bool | None:
        """raw (True/False) for an id this bundle's servers issued; None otherwise."""
        if not 0 < sid < MAX_ID:
            return None
        head, tag = sid >> TAG_BITS, sid & ((1 << TAG_BITS) - 1)
        nonce, raw = head >> 1, bool(head & 1)
        return raw if tag == self._tag(nonce, raw) else None  # not a secret: no constant time


class Sessions:
    """Thread-safe table of recently seen sessions (LRU-bounded; it feeds stats, not access)."""

    def __init__(self, key: bytes, limit: int = 10_000):
        self.limit = limit
        self.ids = SessionIds(key)
        self._table: OrderedDict[int, tuple[Session, float]] = OrderedDict()  # id -> (s, seen)
        self._lock = threading.Lock()
        self.adopted = 0  # sessions first seen here but opened by another replica (or forgotten)

    def open(self, raw: bool, client_id: str = "") -> Session:
        """A new session for a client that passed Hello."""
        session = Session(self.ids.make(raw), raw, client_id[:128])
        self._remember(session)
        return session

    def get(self, sid: int) -> Session:
        """The session with this id, or FAILED_PRECONDITION telling the client to Hello first."""
        with self._lock:
            known = self._table.get(sid)
            if known is not None:
                self._table[sid] = (known[0], time.monotonic())
                self._table.move_to_end(sid)
                return known[0]
        raw = self.ids.mode(sid)
        if raw is None:
            raise RequestError(Kind.PRECONDITION, f"unknown session {sid}; call Hello first")
        session = Session(sid, raw)
        with self._lock:
            self.adopted += 1
        self._remember(session)
        return session

    def _remember(self, session: Session) -> None:
        with self._lock:
            self._table[session.id] = (session, time.monotonic())
            self._table.move_to_end(session.id)
            while len(self._table) > self.limit:
                self._table.popitem(last=False)

    def active(self, within_s: float = 60.0) -> int:
        """Sessions that made a call in the last `within_s` seconds (the table is in recency order)."""
        since = time.monotonic() - within_s
        count = 0
        with self._lock:
            for _, seen in reversed(self._table.values()):
                if seen < since:
                    break
                count += 1
        return count

    def __len__(self) -> int:
        return len(self._table)
