"""ServerConfig: everything one policy server process needs, validated when built."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any


@dataclass
class ServerConfig:
    """How one policy server serves one bundle.

    bundle: policy bundle directory or .tar.
    host, port: where to listen; port 0 picks a free port (tests).
    max_batch: most requests the batcher hands onnxruntime in one call.
    max_delay_ms: how long the batcher holds a first request waiting for company;
        0 means natural batching: the worker takes whatever is queued when it becomes
        free, so a lone client waits ~0.
    max_message_bytes: largest request gRPC accepts; bigger ones get RESOURCE_EXHAUSTED.
    workers: threads that decode PNG/JPEG frames off the event loop (calls and open
        streams themselves cost no thread: the server is grpc.aio).
    grace_s: how long in-flight calls may finish on shutdown.
    ort_threads: intra-op threads per onnxruntime session.
    max_sessions: sessions remembered for stats; a forgotten one still works (its id is
        self-verifying, so any replica of the same bundle accepts it).
    tls_cert, tls_key: PEM server certificate chain and key; both set = TLS.
    client_ca: PEM CA whose certificates clients must present (mutual TLS; needs tls_cert).
    tokens: file of per-device bearer tokens ("device sha256:hex" lines, `splitedge certs`
        writes one); set = every Policy and reflection call needs a valid token.
    metrics_port: Prometheus /metrics on host:metrics_port over HTTP; None = off, 0 = free port.
    """

    bundle: Path
    host: str = "127.0.0.1"
    port: int = 0
    max_batch: int = 64
    max_delay_ms: float = 0.0
    max_message_bytes: int = 4 << 20
    workers: int = 32
    grace_s: float = 5.0
    ort_threads: int = 1
    max_sessions: int = 10_000
    tls_cert: Path | None = None
    tls_key: Path | None = None
    client_ca: Path | None = None
    tokens: Path | None = None
    metrics_port: int | None = None

    def __post_init__(self) -> None:
        self.bundle = Path(self.bundle)
        for name in ("tls_cert", "tls_key", "client_ca", "tokens"):
            value = getattr(self, name)
            setattr(self, name, Path(value) if value not in (None, "") else None)
        if (self.tls_cert is None) != (self.tls_key is None):
            raise ValueError(
                f"tls_cert and tls_key go together, got {self.tls_cert} and {self.tls_key}"
            )
        if self.client_ca is not None and self.tls_cert is None:
            raise ValueError(f"client_ca (mutual TLS) needs tls_cert/tls_key, got {self.client_ca}")
        if self.metrics_port is not None and not 0 <= self.metrics_port <= 65535:
            raise ValueError(f"metrics_port must be in 0..65535, got {self.metrics_port}")
        if not self.host:
            raise ValueError(f"host must be non-empty, got {self.host!r}")
        if not 0 <= self.port <= 65535:
            raise ValueError(f"port must be in 0..65535, got {self.port}")
        if self.max_batch < 1:
            raise ValueError(f"max_batch must be >= 1, got {self.max_batch}")
        if not (math.isfinite(self.max_delay_ms) and 0 <= self.max_delay_ms <= 10_000):
            raise ValueError(f"max_delay_ms must be in [0, 10000], got {self.max_delay_ms}")
        if self.max_message_bytes < 1024:
            raise ValueError(f"max_message_bytes must be >= 1024, got {self.max_message_bytes}")
        for name in ("workers", "ort_threads", "max_sessions"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if not (math.isfinite(self.grace_s) and self.grace_s >= 0):
            raise ValueError(f"grace_s must be a finite number >= 0, got {self.grace_s}")

    @property
    def tls(self) -> bool:
        return self.tls_cert is not None

    @property
    def address(self) -> str:
        """host:port as gRPC wants it (IPv6 hosts bracketed)."""
        host = f"[{self.host}]" if ":" in self.host and not self.host.startswith("[") else self.host
        return f"{host}:{self.port}"

    def to_dict(self) -> dict[str, Any]:
        """Plain data for stats and logs."""
        return {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(self).items()}
