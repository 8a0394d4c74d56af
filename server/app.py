"""Build the gRPC policy server (health + reflection registered) and run it until a signal."""

from __future__ import annotations

import logging
import signal
import threading
from collections.abc import Callable
from concurrent import futures
from types import FrameType

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from protos import policy_pb2 as pb
from protos import policy_pb2_grpc as pb_grpc
from server.config import ServerConfig
from server.servicer import PolicyServicer
from splitedge.errors import SplitedgeError

log = logging.getLogger(__name__)
SERVICE_NAME = pb.DESCRIPTOR.services_by_name["Policy"].full_name  # "splitedge.v1.Policy"


def create_server(
    cfg: ServerConfig,
    servicer: PolicyServicer | None = None,
    health_servicer: health.HealthServicer | None = None,
) -> tuple[grpc.Server, int]:
    """A bound, not yet started server for cfg (port 0 picks a free port) and the port it got.

    Pass your own servicer to read its stats() or close() it; health starts SERVING for
    SERVICE_NAME and "" (the whole server).
    """
    servicer = servicer or PolicyServicer.from_config(cfg)
    health_servicer = health_servicer or health.HealthServicer()
    server = grpc.server(
        futures.ThreadPoolExecutor(max_workers=cfg.workers, thread_name_prefix="grpc"),
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
    pb_grpc.add_PolicyServicer_to_server(servicer, server)
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    for name in (SERVICE_NAME, ""):
        health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
    reflection.enable_server_reflection(
        (SERVICE_NAME, health.SERVICE_NAME, reflection.SERVICE_NAME), server
    )
    try:
        port = server.add_insecure_port(cfg.address)
    except RuntimeError as e:
        port = 0
        reason = str(e)
    else:
        reason = ""
    if not port:
        raise SplitedgeError(
            f"cannot listen on {cfg.address} ({reason or 'bind failed'}); "
            "is the port in use? Pick another with --port"
        )
    return server, port


def serve(
    cfg: ServerConfig,
    on_ready: Callable[[PolicyServicer, int], None] | None = None,
    stop: threading.Event | None = None,
) -> int:
    """Serve until SIGTERM/SIGINT (or `stop` is set): then NOT_SERVING, drain for grace_s, return 0."""
    servicer = PolicyServicer.from_config(cfg)
    health_servicer = health.HealthServicer()
    try:
        server, port = create_server(cfg, servicer, health_servicer)
    except BaseException:
        servicer.close()
        raise
    stop = stop or threading.Event()
    restore = _on_signals(stop)
    try:
        server.start()
        if on_ready:
            on_ready(servicer, port)
        while not stop.wait(0.5):  # a timed wait, so signal handlers get to run promptly
            pass
        log.info("stopping: NOT_SERVING, draining for up to %.1f s", cfg.grace_s)
        health_servicer.enter_graceful_shutdown()  # load balancers stop sending new work
        server.stop(cfg.grace_s).wait()
    finally:
        server.stop(None)
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
