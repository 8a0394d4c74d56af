"""Resource bounds of one server: the request size its bundle needs, gRPC's connection and
stream limits, and how many connections the process's open-file limit leaves room for.

Every limit has a safe default in ServerConfig and a `splitedge serve` flag. Memory at the
limits is about: base + connections x ~30 KB + open calls x ~15 KB + held bodies x the
request cap (docs/results/server.md measures it).
"""

from __future__ import annotations

import logging
import resource
from typing import Any

from server.config import ServerConfig
from server.models import PolicyModels
from splitedge.errors import SplitedgeError

log = logging.getLogger(__name__)
MIN_REQUEST_BYTES = 16 << 10
HEADROOM_BYTES = 4 << 10  # the ActRequest and Tensor fields around the data
MAX_REPLY_BYTES = 4 << 20  # our own replies (actions, reflection's descriptors)
FILES_RESERVED = 128  # open files that are not client connections: onnxruntime, gRPC, logs
METRICS_CONNECTIONS = 64  # the HTTP endpoint's own cap (server/http.py)


def largest_request_bytes(models: PolicyModels) -> int:
    """The data bytes of the biggest request this bundle accepts: a raw uint8 frame, or its
    features sent as float32 (which a uint8 bundle accepts too)."""
    features = models.features.nbytes * (4 if models.features.dtype == "uint8" else 1)
    return max(models.observation.nbytes, features)


def request_limit(cfg: ServerConfig, models: PolicyModels) -> int:
    """The receive limit: cfg.max_message_bytes, else twice the largest valid request (a PNG
    or JPEG of noise can outgrow its raw frame) plus headroom, at least MIN_REQUEST_BYTES.
    SplitedgeError if cfg's limit would refuse this bundle's own valid requests."""
    largest = largest_request_bytes(models)
    if cfg.max_message_bytes is None:
        return max(MIN_REQUEST_BYTES, 2 * largest + HEADROOM_BYTES)
    if cfg.max_message_bytes < largest + HEADROOM_BYTES:
        raise SplitedgeError(
            f"max_message_bytes {cfg.max_message_bytes} is below what this bundle's own "
            f"requests need ({largest} data bytes + {HEADROOM_BYTES}); raise it or leave it unset"
        )
    return cfg.max_message_bytes


def connection_limit(cfg: ServerConfig) -> int:
    """cfg.max_connections, lowered (with a warning) to what RLIMIT_NOFILE leaves room for
    after raising the soft limit as far as the hard one allows."""
    want = cfg.max_connections + FILES_RESERVED + METRICS_CONNECTIONS
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY and soft < want:
        new = want if hard == resource.RLIM_INFINITY else min(want, hard)
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (new, hard))
            soft = new
        except (ValueError, OSError):
            pass
    if soft == resource.RLIM_INFINITY or soft >= want:
        return cfg.max_connections
    allowed = max(1, soft - FILES_RESERVED - METRICS_CONNECTIONS)
    log.warning(
        "max_connections lowered from %d to %d: this process may open only %d files "
        "(ulimit -n); raise that limit to allow more",
        cfg.max_connections,
        allowed,
        soft,
        extra={"event": "limit_lowered", "max_connections": allowed, "nofile": soft},
    )
    return allowed


def grpc_options(
    cfg: ServerConfig, max_request: int, max_connections: int
) -> list[tuple[str, Any]]:
    """gRPC core options that enforce cfg's limits."""
    ms = lambda seconds: max(1, round(seconds * 1000))  # noqa: E731
    options: list[tuple[str, Any]] = [
        # A request over this limit gets RESOURCE_EXHAUSTED from gRPC itself, before any of
        # our code runs (a 64 MB "frame" never reaches the decoder); that status is clear.
        ("grpc.max_receive_message_length", max_request),
        ("grpc.max_send_message_length", MAX_REPLY_BYTES),
        ("grpc.so_reuseport", 0),  # a second server on a busy port must fail, not share it
        # No bandwidth-delay PINGs: decisions are ~100-byte messages, and on a 20 kbit/s
        # uplink each probe costs as much airtime as a fifth of a decision. (This also keeps
        # each stream's receive window at HTTP/2's 64 KiB, so a held body stays small.)
        ("grpc.http2.bdp_probe", 0),
        ("grpc.max_concurrent_streams", cfg.max_streams_per_connection),
        ("grpc.max_allowed_incoming_connections", max_connections),
        ("grpc.max_connection_idle_ms", ms(cfg.max_connection_idle_s)),
        ("grpc.server_handshake_timeout_ms", ms(cfg.handshake_s)),
        # Our pings find dead peers; theirs are allowed every min_client_ping_s (edge clients
        # ping every 30 s to notice dead links), more often is a strike, 2 strikes a GOAWAY.
        ("grpc.keepalive_time_ms", ms(cfg.keepalive_s)),
        ("grpc.keepalive_timeout_ms", ms(cfg.keepalive_timeout_s)),
        ("grpc.keepalive_permit_without_calls", 1),
        ("grpc.http2.min_ping_interval_without_data_ms", ms(cfg.min_client_ping_s)),
        ("grpc.http2.max_ping_strikes", 2),
        ("grpc.max_metadata_size", 8 << 10),
    ]
    if cfg.max_connection_age_s > 0:
        options += [
            ("grpc.max_connection_age_ms", ms(cfg.max_connection_age_s)),
            ("grpc.max_connection_age_grace_ms", ms(cfg.max_connection_age_grace_s)),
        ]
    return options
