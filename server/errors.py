"""Why a request was refused, without any gRPC: status.py maps each kind to a status code."""

from __future__ import annotations

from enum import Enum
from typing import Any

ECHO_CHARS = 120  # the most of any client-sent value a message repeats back
MESSAGE_CHARS = 1024  # a whole status message: far under gRPC's 8 KiB trailer budget
DRAINING = "server is shutting down; reconnect (another replica will answer)"


class Kind(str, Enum):
    """What went wrong with a request, from the client's point of view."""

    INVALID = "invalid"  # the request itself is malformed (shape, dtype, bytes, NaN, codec)
    PRECONDITION = (
        "precondition"  # well-formed, but the session state forbids it (no Hello, mismatch)
    )
    DEADLINE = "deadline"  # the client's (or the server's default) deadline passed
    UNAVAILABLE = "unavailable"  # the server is shutting down
    IDLE = "idle"  # a stream sent nothing for too long; open a new one when needed
    EXHAUSTED = "exhausted"  # a server limit is reached (e.g. health watchers)
    NOT_FOUND = "not_found"  # a health check for a service this server does not have
    UNAUTHENTICATED = "unauthenticated"  # no bearer token, or one no device owns
    INTERNAL = "internal"  # a bug or a model failure on our side


class RequestError(Exception):
    """A refused request: its kind picks the status code, its message tells the client what to fix."""

    def __init__(self, kind: Kind, message: str):
        message = clip(message, MESSAGE_CHARS)
        super().__init__(message)
        self.kind = kind
        self.message = message


def clip(text: str, limit: int) -> str:
    """text, cut to at most about `limit` characters with a note of how long it was."""
    if len(text) <= limit:
        return text
    return f"{text[:limit]}… ({len(text)} chars)"


def echo(value: Any) -> str:
    """A client-sent value as a message may quote it: str() of it, at most ECHO_CHARS long."""
    return clip(value if isinstance(value, str) else str(value), ECHO_CHARS)
