"""Why a request was refused, without any gRPC: status.py maps each kind to a status code."""

from __future__ import annotations

from enum import Enum


class Kind(str, Enum):
    """What went wrong with a request, from the client's point of view."""

    INVALID = "invalid"  # the request itself is malformed (shape, dtype, bytes, NaN, codec)
    PRECONDITION = (
        "precondition"  # well-formed, but the session state forbids it (no Hello, mismatch)
    )
    DEADLINE = "deadline"  # the client's deadline passed while the request waited
    UNAVAILABLE = "unavailable"  # the server is shutting down
    UNAUTHENTICATED = "unauthenticated"  # no bearer token, or one no device owns
    INTERNAL = "internal"  # a bug or a model failure on our side


class RequestError(Exception):
    """A refused request: its kind picks the status code, its message tells the client what to fix."""

    def __init__(self, kind: Kind, message: str):
        super().__init__(message)
        self.kind = kind
        self.message = message
