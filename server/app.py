"""Build the grpc.aio policy server (health + reflection registered) and run it until a signal.

The server runs on its own event-loop thread; `PolicyServer` drives it with blocking calls
shaped like grpc.Server's (start, stop(grace).wait()), so callers and tests need no asyncio.
Every call passes server/guard.py first; server/limits.py turns ServerConfig's limits into
gRPC options; server/http.py serves /metrics, /ready and /live.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import ssl
import sys
import threading
from collections.abc import Callable, Coroutine
from types import FrameType
from typing import Any, TypeVar

import grpc
from grpc_health.v1 import health, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from protos import policy_pb2 as pb
from protos import policy_pb2_grpc as pb_grpc
from server.auth import TokenTable, server_credentials
from server.config import ServerConfig, _address
from server.guard import Guard
from server.health import SERVING, Health
from server.http import MetricsEndpoint, bind_failure
from server.limits import METRICS_CONNECTIONS, connection_limit, grpc_options, request_limit
from server.servicer import PolicyServicer
from splitedge.errors import SplitedgeError

log = logging.getLogger("splitedge.server")
SERVICE_NAME = pb.DESCRIPTOR.services_by_name["Policy"].full_name  # "splitedge.v1.Policy"
T = TypeVar("T")
GIL_SWITCH_S = 0.0005
# Drain in three steps, because gRPC cancels (CANCELLED, not retryable) the calls it holds
# but has not handed to us when the listener stops: first, for SETTLE_S, calls keep reaching
# the servicer (Act is answered, so every call in flight at the signal completes; Hello and
# new streams get UNAVAILABLE); then new calls get UNAVAILABLE from their headers until none
# has arrived for QUIET_S (at most SETTLE_S more), so clients have gone elsewhere; then stop.
SETTLE_S, QUIET_S = 0.5, 0.05
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)


class PolicyServer:
    """A bound grpc.aio policy server on its own event-loop thread, with blocking controls."""

    def __init__(self, cfg: ServerConfig, servicer: PolicyServicer):
        self.cfg, self.servicer = cfg, servicer
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, name="grpc-aio", daemon=True)
        self._thread.start()
        self.health = Health(cfg.max_health_watches, servicer.refused)
        servicer.metrics.health_watches.set_function(lambda: self.health.watches)
        self.metrics_port: int | None = None
        self.health_port: int | None = None
        self._http: MetricsEndpoint | None = None
        self._probe_server: grpc.aio.Server | None = None
        try:
            self.max_request = request_limit(cfg, servicer.models)
            self.max_connections = connection_limit(cfg)
            self.server, self.port = self._run(self._build())
            if cfg.health_port is not None:
                self._probe_server, self.health_port = self._run(self._build_probe())
            if cfg.metrics_port is not None:
                self._http = _metrics_endpoint(cfg, servicer)
                self.metrics_port = self._http.start(cfg.metrics_host, cfg.metrics_port)
        except BaseException:
            self._close_loop()
            raise

    def _run(self, coro: Coroutine[Any, Any, T], timeout: float | None = None) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def _guard(self, tokens: TokenTable | None) -> Guard:
        cfg, servicer = self.cfg, self.servicer
        return Guard(
            servicer.reaper,
            cfg.unary_deadline_s,
            cfg.stream_idle_s,
            servicer.refused,
            tokens,
            mutual_tls=cfg.client_ca is not None,
        )

    async def _build(self) -> tuple[grpc.aio.Server, int]:
        cfg = self.cfg
        tokens = TokenTable.load(cfg.tokens) if cfg.tokens is not None else None
        credentials = server_credentials(cfg)
        self.guard = self._guard(tokens)
        server = grpc.aio.server(
            interceptors=[self.guard],
            options=grpc_options(cfg, self.max_request, self.max_connections),
            maximum_concurrent_rpcs=cfg.max_rpcs,
        )
        pb_grpc.add_PolicyServicer_to_server(self.servicer, server)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, server)
        for name in (SERVICE_NAME, ""):
            await self.health.set(name, SERVING)
        reflection.enable_server_reflection(
            (SERVICE_NAME, health.SERVICE_NAME, reflection.SERVICE_NAME), server
        )
        try:
            if credentials is None:
                port = server.add_insecure_port(cfg.address)
            else:
                port = server.add_secure_port(cfg.address, credentials)
        except RuntimeError:
            port = 0
        if not port:
            raise bind_failure(cfg.host, cfg.port, None, "--port")
        return server, port

    async def _build_probe(self) -> tuple[grpc.aio.Server, int]:
        """grpc.health.v1 alone, in plaintext, on cfg.health_port (for kubelet's gRPC probe)."""
        cfg = self.cfg
        assert cfg.health_port is not None
        server = grpc.aio.server(
            interceptors=[self._guard(None)],
            options=grpc_options(cfg, 4 << 10, 64),
            maximum_concurrent_rpcs=256,
        )
        health_pb2_grpc.add_HealthServicer_to_server(self.health, server)
        try:
            port = server.add_insecure_port(_address(cfg.host, cfg.health_port))
        except RuntimeError:
            port = 0
        if not port:
            raise bind_failure(cfg.host, cfg.health_port, None, "--health-port")
        return server, port

    def start(self) -> None:
        """Start answering calls."""
        self.servicer.reaper.start(self.loop)
        self._run(self.server.start())
        if self._probe_server is not None:
            self._run(self._probe_server.start())

    def stop(self, grace: float | None) -> threading.Event:
        """Drain: health NOT_SERVING and /ready 503, no new sessions or streams, idle streams
        end; after SETTLE_S, new calls are refused until quiet (see SETTLE_S); then stop
        listening and let in-flight calls finish within `grace` seconds in all; `.wait()` on
        the result."""
        done = threading.Event()
        if self.loop.is_closed():
            done.set()
            return done

        async def go() -> None:
            # one step on the loop: no new call can slip in between NOT_SERVING and the drain
            await self.health.enter_graceful_shutdown()
            self.servicer.begin_drain()
            loop = asyncio.get_running_loop()
            start, settle = loop.time(), min(SETTLE_S, (grace or 0.0) / 4)
            if settle:
                await asyncio.sleep(settle)
                self.guard.closing = True
                until = start + 2 * settle
                while loop.time() < until and loop.time() - self.guard.last_call < QUIET_S:
                    await asyncio.sleep(QUIET_S / 2)
            left = None if grace is None else max(0.0, grace - (loop.time() - start))
            await self.server.stop(left)
            if self._probe_server is not None:
                await self._probe_server.stop(None)
            self.servicer.reaper.stop()

        self.servicer.mark_draining()  # now, not when the loop gets to go(): /ready is 503
        future = asyncio.run_coroutine_threadsafe(go(), self.loop)
        future.add_done_callback(lambda _: done.set())
        return done

    def close(self) -> None:
        """Stop the server now (if still running), the metrics endpoint and the loop thread."""
        if not self.loop.is_closed():
            self.stop(None).wait()
            self._close_loop()

    def _close_loop(self) -> None:
        if self._http is not None:
            self._http.close()
            self._http = None
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join()
        self.loop.close()


def _metrics_endpoint(cfg: ServerConfig, servicer: PolicyServicer) -> MetricsEndpoint:
    token = None
    if cfg.metrics_token is not None:
        try:
            token = cfg.metrics_token.read_text().strip()
        except OSError as e:
            raise SplitedgeError(
                f"cannot read the metrics token file {cfg.metrics_token} ({e.strerror})"
            ) from e
        if not token:
            raise SplitedgeError(f"metrics token file {cfg.metrics_token} is empty")
    tls = None
    if cfg.metrics_tls:
        assert cfg.tls_cert is not None and cfg.tls_key is not None
        tls = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        try:
            tls.load_cert_chain(cfg.tls_cert, cfg.tls_key)
        except (OSError, ssl.SSLError) as e:
            raise SplitedgeError(
                f"cannot use {cfg.tls_cert} / {cfg.tls_key} for the metrics endpoint ({e})"
            ) from e
    return MetricsEndpoint(
        servicer.metrics.render,
        lambda: not servicer.draining,
        token=token,
        tls=tls,
        max_connections=METRICS_CONNECTIONS,
    )


def create_server(
    cfg: ServerConfig, servicer: PolicyServicer | None = None
) -> tuple[PolicyServer, int]:
    """A bound, not yet started server for cfg (port 0 picks a free port) and the port it got.

    Pass your own servicer to read its stats() or close() it; health starts SERVING for
    SERVICE_NAME and "" (the whole server). Metrics start with it when cfg.metrics_port is set.
    """
    owned = servicer is None
    servicer = servicer or PolicyServicer.from_config(cfg)
    try:
        server = PolicyServer(cfg, servicer)
    except BaseException:
        if owned:
            servicer.close()
        raise
    return server, server.port


def serve(
    cfg: ServerConfig,
    on_ready: Callable[[PolicyServicer, PolicyServer], None] | None = None,
    stop: threading.Event | None = None,
) -> int:
    """Serve until SIGTERM/SIGINT/SIGHUP (or `stop` is set): drain for grace_s, return 0."""
    # Each decision crosses from the event loop to the batcher thread and back; with the
    # default 5 ms GIL switch interval a busy thread can hold that hand-off up to 5 ms,
    # which showed as a 5 ms p99 for a lone client. This process is ours: switch sooner.
    sys.setswitchinterval(GIL_SWITCH_S)
    servicer = PolicyServicer.from_config(cfg)
    try:
        server, _port = create_server(cfg, servicer)
    except BaseException:
        servicer.close()
        raise
    stop = stop or threading.Event()
    received: list[str] = []
    restore = _on_signals(stop, received)
    try:
        server.start()
        log.info(
            "serving",
            extra={
                "event": "start",
                "address": _address(cfg.host, server.port),
                "bundle": f"{servicer.models.name} {servicer.models.version}",
                "max_request_bytes": server.max_request,
                "max_connections": server.max_connections,
            },
        )
        if on_ready:
            on_ready(servicer, server)
        while not stop.wait(0.5):  # a timed wait, so signal handlers get to run promptly
            pass
        log.info(
            "draining: NOT_SERVING, in-flight calls get up to %.1f s",
            cfg.grace_s,
            extra={"event": "drain", "signal": received[0] if received else "stop"},
        )
        server.stop(cfg.grace_s).wait()
    finally:
        server.close()
        servicer.close()
        restore()
    stats = servicer.stats()
    log.info(
        "stopped",
        extra={"event": "exit", "decisions": stats["decisions"], "errors": stats["errors"]},
    )
    return 0


def _on_signals(stop: threading.Event, received: list[str]) -> Callable[[], None]:
    """Make SIGTERM/SIGINT/SIGHUP set `stop` (main thread only); returns a function restoring
    the old handlers. SIGHUP drains too: a closed terminal or a supervisor's HUP must not kill
    calls in flight (the server has no config to reload; restart it to change one)."""
    if threading.current_thread() is not threading.main_thread():
        return lambda: None

    def handler(signum: int, frame: FrameType | None) -> None:
        received.append(signal.Signals(signum).name)
        stop.set()

    previous = {sig: signal.signal(sig, handler) for sig in STOP_SIGNALS}

    def restore() -> None:
        for sig, old in previous.items():
            signal.signal(sig, old)

    return restore
