"""ServerConfig: everything one policy server process needs, validated when built."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

LOG_LEVELS = ("debug", "info", "warning", "error")


@dataclass
class ServerConfig:
    """How one policy server serves one bundle.

    bundle: policy bundle directory or .tar.
    host, port: where to listen; port 0 picks a free port (tests).
    max_batch: most requests the batcher hands onnxruntime in one call.
    max_delay_ms: how long the batcher holds a first request waiting for company;
        0 means natural batching: the worker takes whatever is queued when it becomes
        free, so a lone client waits ~0.
    max_message_bytes: largest request gRPC accepts (bigger: RESOURCE_EXHAUSTED before any
        of our code runs); None = derived from the bundle: twice its largest valid request
        (a raw frame, or float32 features) plus 4 KiB, at least 16 KiB.
    workers: threads that decode PNG/JPEG frames off the event loop (calls and open
        streams themselves cost no thread: the server is grpc.aio).
    grace_s: how long in-flight calls may finish on shutdown.
    ort_threads: intra-op threads per onnxruntime session.
    max_sessions: sessions remembered for stats; a forgotten one still works (its id is
        self-verifying, so any replica of the same bundle accepts it).
    tls_cert, tls_key: PEM server certificate chain and key; both set = TLS.
    client_ca: PEM CA whose certificates clients must present (mutual TLS; needs tls_cert).
    tokens: file of per-device bearer tokens ("device sha256:hex" lines, `splitedge certs`
        writes one); set = every Policy and reflection call needs a valid token, checked
        from its headers before its body is read.

    Limits (each bounds memory, file descriptors or time one client can hold):
    max_connections: open client connections; more are closed as they arrive (lowered at
        start to what the process's open-file limit allows).
    max_streams_per_connection: concurrent calls per HTTP/2 connection (SETTINGS).
    max_rpcs: calls open at once over all connections; more get RESOURCE_EXHAUSTED.
    max_connection_idle_s: a connection with no call for this long is closed (GOAWAY).
    max_connection_age_s: a connection is asked to reconnect after this long (0 = never);
        its calls get max_connection_age_grace_s more to finish.
    keepalive_s, keepalive_timeout_s: the server pings a quiet connection after keepalive_s
        and closes it if no answer comes within keepalive_timeout_s (dead peers).
    min_client_ping_s: clients may ping at most this often; faster pings are a strike, and
        a few strikes close the connection (gRPC's keepalive enforcement).
    handshake_s: time a new connection gets to finish TLS and send its HTTP/2 preface.
    stream_idle_s: an ActStream (or reflection stream) with no request for this long is
        closed (UNAVAILABLE); the client opens a new one when it has a request.
    unary_deadline_s: the server's deadline for a unary call, reading its body included,
        when the client sets none or a longer one (DEADLINE_EXCEEDED).
    max_health_watches: open grpc.health.v1 Watch streams; more get RESOURCE_EXHAUSTED.

    metrics_port: Prometheus /metrics plus /ready and /live over HTTP on
        metrics_host:metrics_port; None = off, 0 = a free port.
    metrics_host: where that endpoint listens (default loopback only).
    metrics_token: file holding a bearer token /metrics requires (None = open; /ready and
        /live stay open for probes and say nothing about the bundle).
    metrics_tls: serve that endpoint over HTTPS with tls_cert/tls_key.
    health_port: a second, plaintext port that serves only grpc.health.v1 (kubelet's gRPC
        probe cannot speak TLS); None = off.
    log_level, log_json: server log verbosity and one-JSON-object-per-line output.
    """

    bundle: Path
    host: str = "127.0.0.1"
    port: int = 0
    max_batch: int = 64
    max_delay_ms: float = 0.0
    max_message_bytes: int | None = None
    workers: int = 32
    grace_s: float = 5.0
    ort_threads: int = 1
    max_sessions: int = 10_000
    tls_cert: Path | None = None
    tls_key: Path | None = None
    client_ca: Path | None = None
    tokens: Path | None = None
    max_connections: int = 1000
    max_streams_per_connection: int = 100
    max_rpcs: int = 5_000
    max_connection_idle_s: float = 300.0
    max_connection_age_s: float = 3600.0
    max_connection_age_grace_s: float = 60.0
    keepalive_s: float = 120.0
    keepalive_timeout_s: float = 20.0
    min_client_ping_s: float = 20.0
    handshake_s: float = 10.0
    stream_idle_s: float = 300.0
    unary_deadline_s: float = 30.0
    max_health_watches: int = 1000
    metrics_port: int | None = None
    metrics_host: str = "127.0.0.1"
    metrics_token: Path | None = None
    metrics_tls: bool = False
    health_port: int | None = None
    log_level: str = "info"
    log_json: bool = False

    def __post_init__(self) -> None:
        self.bundle = Path(self.bundle)
        for name in ("tls_cert", "tls_key", "client_ca", "tokens", "metrics_token"):
            value = getattr(self, name)
            setattr(self, name, Path(value) if value not in (None, "") else None)
        if (self.tls_cert is None) != (self.tls_key is None):
            raise ValueError(
                f"tls_cert and tls_key go together, got {self.tls_cert} and {self.tls_key}"
            )
        if self.client_ca is not None and self.tls_cert is None:
            raise ValueError(f"client_ca (mutual TLS) needs tls_cert/tls_key, got {self.client_ca}")
        if self.metrics_tls and self.tls_cert is None:
            raise ValueError("metrics_tls needs tls_cert/tls_key, got none")
        for name in ("metrics_port", "health_port"):
            value = getattr(self, name)
            if value is not None and not 0 <= value <= 65535:
                raise ValueError(f"{name} must be in 0..65535, got {value}")
        for name in ("host", "metrics_host"):
            if not getattr(self, name):
                raise ValueError(f"{name} must be non-empty, got {getattr(self, name)!r}")
        if not 0 <= self.port <= 65535:
            raise ValueError(f"port must be in 0..65535, got {self.port}")
        if self.max_batch < 1:
            raise ValueError(f"max_batch must be >= 1, got {self.max_batch}")
        if not (math.isfinite(self.max_delay_ms) and 0 <= self.max_delay_ms <= 10_000):
            raise ValueError(f"max_delay_ms must be in [0, 10000], got {self.max_delay_ms}")
        if self.max_message_bytes is not None and self.max_message_bytes < 1024:
            raise ValueError(f"max_message_bytes must be >= 1024, got {self.max_message_bytes}")
        for name in (
            "workers",
            "ort_threads",
            "max_sessions",
            "max_connections",
            "max_streams_per_connection",
            "max_rpcs",
            "max_health_watches",
        ):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if not (math.isfinite(self.grace_s) and self.grace_s >= 0):
            raise ValueError(f"grace_s must be a finite number >= 0, got {self.grace_s}")
        for name in ("max_connection_age_s", "max_connection_age_grace_s"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value >= 0):
                raise ValueError(f"{name} must be a finite number >= 0, got {value}")
        for name in (
            "max_connection_idle_s",
            "keepalive_s",
            "keepalive_timeout_s",
            "min_client_ping_s",
            "handshake_s",
            "stream_idle_s",
            "unary_deadline_s",
        ):
            value = getattr(self, name)
            if not (math.isfinite(value) and 0 < value <= 86_400 * 30):
                raise ValueError(f"{name} must be > 0 s and at most 30 days, got {value}")
        if self.log_level not in LOG_LEVELS:
            raise ValueError(
                f"log_level must be one of {', '.join(LOG_LEVELS)}, got {self.log_level!r}"
            )

    @property
    def tls(self) -> bool:
        return self.tls_cert is not None

    @property
    def address(self) -> str:
        """host:port as gRPC wants it (IPv6 hosts bracketed)."""
        return _address(self.host, self.port)

    def to_dict(self) -> dict[str, Any]:
        """Plain data for stats and logs."""
        return {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(self).items()}


def _address(host: str, port: int) -> str:
    host = f"[{host}]" if ":" in host and not host.startswith("[") else host
    return f"{host}:{port}"
