"""The one place that chooses gRPC status codes for refused requests."""

from __future__ import annotations

import grpc

from server.errors import Kind

CODES: dict[Kind, grpc.StatusCode] = {
    Kind.INVALID: grpc.StatusCode.INVALID_ARGUMENT,
    Kind.PRECONDITION: grpc.StatusCode.FAILED_PRECONDITION,
    Kind.DEADLINE: grpc.StatusCode.DEADLINE_EXCEEDED,
    Kind.UNAVAILABLE: grpc.StatusCode.UNAVAILABLE,
    # an idle stream is closed so that it costs nothing; the client opens a new one when it
    # has a request: the same "try again" meaning as a draining server's UNAVAILABLE
    Kind.IDLE: grpc.StatusCode.UNAVAILABLE,
    Kind.EXHAUSTED: grpc.StatusCode.RESOURCE_EXHAUSTED,
    Kind.NOT_FOUND: grpc.StatusCode.NOT_FOUND,  # what grpc.health.v1 specifies
    Kind.UNAUTHENTICATED: grpc.StatusCode.UNAUTHENTICATED,
    Kind.INTERNAL: grpc.StatusCode.INTERNAL,
}

# Not ours to choose:
# - a request over ServerConfig.max_message_bytes is refused by gRPC itself with
#   RESOURCE_EXHAUSTED before any handler runs; that is a clear status, so we keep it.
#   So is gRPC's own RESOURCE_EXHAUSTED past max_rpcs ("Concurrent RPC limit exceeded").
# - a failed TLS handshake (a plaintext client, no client certificate under mTLS, a
#   certificate from another CA) ends the connection before any RPC exists, so the client's
#   gRPC reports UNAVAILABLE; a bad or missing bearer token is ours: UNAUTHENTICATED.
# - connections past max_connections, idle past max_connection_idle_s or older than
#   max_connection_age_s are closed by gRPC core (GOAWAY); clients reconnect.


def code_for(kind: Kind) -> grpc.StatusCode:
    """The status code a refused request of this kind gets."""
    return CODES[kind]
