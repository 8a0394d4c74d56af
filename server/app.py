"""Build the grpc.aio policy server (health + reflection registered) and run it until a signal.

The server runs on its own event-loop thread; `PolicyServer` drives it with blocking calls
shaped like grpc.Server's (start, stop(grace).wait()), so callers and tests need no asyncio.
"""

from __future__ import annotations

import asyncio
import logging
import signal
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
from server.auth import AuthInterceptor, TokenTable, server_credentials
from server.config import ServerConfig
from server.health import SERVING, Health
from server.servicer import PolicyServicer
from splitedge.errors import SplitedgeError

log = logging.getLogger(__name__)
SERVICE_NAME = pb.DESCRIPTOR.services_by_name["Policy"].full_name  # "splitedge.v1.Policy"
T = TypeVar("T")
GIL_SWITCH_S = 0.0005


class PolicyServer:
    """A bound grpc.aio policy server on its own event-loop thread, with blocking controls."""

    def __init__(self, cfg: ServerConfig, servicer: PolicyServicer):
        self.cfg, self.servicer = cfg, servicer
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, name="grpc-aio", daemon=True)
        self._thread.start()
        self.health = Health()
        self.metrics_port: int | None = None
        try:
            self.server, self.port = self._run(self._build())
            if cfg.metrics_port is not None:
                self.metrics_port = servicer.metrics.serve_http(cfg.host, cfg.metrics_port)
        except BaseException:
            self._close_loop()
            raise

    def _run(self, coro: Coroutine[Any, Any, T], timeout: float | None = None) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    async def _build(self) -> tuple[grpc.aio.Server, int]:
        cfg = self.cfg
        interceptors = []
        if cfg.tokens is not None:
            tokens = TokenTable.load(cfg.tokens)
            interceptors.append(
                AuthInterceptor(tokens, cfg.client_ca is not None, self.servicer.metrics.answered)
            )
        credentials = server_credentials(cfg)
        server = grpc.aio.server(
            interceptors=interceptors,
            options=[
                # A request over this limit gets RESOURCE_EXHAUSTED from gRPC itself, before any of
                # our code runs (a 64 MB "frame" never reaches the decoder); that status is clear.
                ("grpc.max_receive_message_length", cfg.max_message_bytes),
                ("grpc.max_send_message_length", cfg.max_message_bytes),
                ("grpc.so_reuseport", 0),  # a second server on a busy port must fail, not share it
                # No bandwidth-delay PINGs: decisions are ~100-byte messages, and on a 20 kbit/s
                # uplink each probe costs as much airtime as a fifth of a decision.
                ("grpc.http2.bdp_probe", 0),
                # Edge clients ping every 30 s to notice dead links; allow it without a GOAWAY.
                ("grpc.http2.min_ping_interval_without_data_ms", 20_000),
                ("grpc.keepalive_permit_without_calls", 1),
            ],
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
        except RuntimeError as e:
            port, reason = 0, str(e)
        else:
            reason = ""
        if not port:
            raise SplitedgeError(
                f"cannot listen on {cfg.address} ({reason or 'bind failed'}); "
                "is the port in use? Pick another with --port"
            )
        return server, port

    def start(self) -> None:
        """Start answering calls."""
        self._run(self.server.start())

    def stop(self, grace: float | None) -> threading.Event:
        """Drain: health NOT_SERVING, refuse new calls, end idle streams, let in-flight calls
        finish for up to `grace` seconds; `.wait()` on the result."""
        done = threading.Event()
        if self.loop.is_closed():
            done.set()
            return done

        async def go() -> None:
            # one step on the loop: no new call can slip in between NOT_SERVING and the stop
            await self.health.enter_graceful_shutdown()
            self.servicer.begin_drain()
            await self.server.stop(grace)

        future = asyncio.run_coroutine_threadsafe(go(), self.loop)
        future.add_done_callback(lambda _: done.set())
        return done

    def close(self) -> None:
        """Stop the server now (if still running) and the event-loop thread."""
        if not self.loop.is_closed():
            self.stop(None).wait()
            self._close_loop()

    def _close_loop(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join()
        self.loop.close()


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
    """Serve until SIGTERM/SIGINT (or `stop` is set): NOT_SERVING, drain for grace_s, return 0."""
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
    restore = _on_signals(stop)
    try:
        server.start()
        if on_ready:
            on_ready(servicer, server)
        while not stop.wait(0.5):  # a timed wait, so signal handlers get to run promptly
            pass
        log.info("stopping: NOT_SERVING, draining for up to %.1f s", cfg.grace_s)
        server.stop(cfg.grace_s).wait()
    finally:
        server.close()
        servicer.close()
        restore()
    return 0


def _on_signals(stop: threading.Event) -> Callable[[], None]:
    """Make SIGTERM/SIGINT set `stop` (main thread only); returns a function restoring the old handlers."""
    if threading.current_thread() is not threading.main_thread():
        return lambda: None

    def handler(signum: int, frame: FrameType | None) -> None:
        stop.set()

    previous = {sig: signal.signal(sig, handler) for sig in (signal.SIGTERM, signal.SIGINT)}

    def restore() -> None:
        for sig, old in previous.items():
            signal.signal(sig, old)

    return restore
