"""Prometheus metrics of one policy server, in its own registry (so tests may run several)."""

from __future__ import annotations

from collections.abc import Callable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)
# from a lone request on an idle server (~50 us) to a queue a whole deadline long
SECONDS_BUCKETS = (5e-5, 1e-4, 2.5e-4, 5e-4, 1e-3, 2.5e-3, 5e-3, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0)


class Metrics:
    """Requests and errors by status code, batch sizes, queue/compute times, sessions, streams."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.requests = Counter(
            "splitedge_requests",
            "Answered requests by method and gRPC status code (Act: one per decision, ActStream: one per message)",
            ["method", "code"],
            registry=r,
        )
        self.errors = Counter(
            "splitedge_errors",
            "Refused requests by gRPC status code",
            ["method", "code"],
            registry=r,
        )
        self.batch_size = Histogram(
            "splitedge_batch_size",
            "Samples per onnxruntime call",
            ["model"],
            buckets=BATCH_BUCKETS,
            registry=r,
        )
        self.queue_seconds = Histogram(
            "splitedge_queue_seconds",
            "Time a request waited in the batcher before its batch ran",
            ["model"],
            buckets=SECONDS_BUCKETS,
            registry=r,
        )
        self.compute_seconds = Histogram(
            "splitedge_compute_seconds",
            "Duration of one batched onnxruntime call",
            ["model"],
            buckets=SECONDS_BUCKETS,
            registry=r,
        )
        self.open_streams = Gauge("splitedge_open_streams", "ActStream calls now open", registry=r)
        self.health_watches = Gauge(
            "splitedge_health_watches", "grpc.health.v1 Watch streams now open", registry=r
        )
        self.sessions = Gauge(
            "splitedge_sessions",
            "Connected sessions: those that called in the last 60 s",
            registry=r,
        )
        self.serving = Gauge(
            "splitedge_serving", "1 while serving, 0 once draining for shutdown", registry=r
        )
        self.info = Gauge(
            "splitedge_bundle_info",
            "The bundle served (value 1)",
            ["name", "version", "encoder_digest"],
            registry=r,
        )
        self.serving.set(1)

    def describe_bundle(self, name: str, version: str, digest: str) -> None:
        """Record which bundle this server serves."""
        self.info.labels(name, version, digest).set(1)

    def count_sessions_with(self, active: Callable[[], float]) -> None:
        """Read the connected-session count from `active` at every scrape."""
        self.sessions.set_function(active)

    def answered(self, method: str, code: str = "OK") -> None:
        """Count one request answered with this status code."""
        self.requests.labels(method, code).inc()
        if code != "OK":
            self.errors.labels(method, code).inc()

    def batch_observer(self, model: str) -> Callable[[int, float], None]:
        """A callback for DynamicBatcher: (batch size, compute seconds) of each model call."""
        size, compute = self.batch_size.labels(model), self.compute_seconds.labels(model)

        def observe(n: int, seconds: float) -> None:
            size.observe(n)
            compute.observe(seconds)

        return observe

    def render(self) -> bytes:
        """Every metric in Prometheus' text format (what GET /metrics answers)."""
        return bytes(generate_latest(self.registry))
