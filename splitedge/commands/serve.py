"""`splitedge serve`: run the policy server for one bundle until SIGTERM, SIGHUP or Ctrl-C."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from splitedge.output import emit

# (flag, type, default, help) of every limit, in ServerConfig's names; defaults must match it
# (tests/test_server_limits.py checks)
LIMITS: list[tuple[str, type, Any, str]] = [
    ("--max-message-bytes", int, None,
     "largest request accepted (default: derived from the bundle: twice its largest valid "
     "request + 4 KiB, at least 16 KiB)"),
    ("--max-sessions", int, 10_000, "sessions remembered for stats (default: %(default)s)"),
    ("--max-connections", int, 1000,
     "open client connections; more are closed on arrival (lowered to fit `ulimit -n`; "
     "default: %(default)s)"),
    ("--max-streams-per-connection", int, 100,
     "concurrent calls per HTTP/2 connection (default: %(default)s)"),
    ("--max-rpcs", int, 5_000,
     "calls open at once, all connections together; more get RESOURCE_EXHAUSTED "
     "(default: %(default)s)"),
    ("--max-connection-idle-s", float, 300.0,
     "close a connection with no call for this long (default: %(default)s)"),
    ("--max-connection-age-s", float, 3600.0,
     "ask a connection to reconnect after this long; 0 = never (default: %(default)s)"),
    ("--max-connection-age-grace-s", float, 60.0,
     "time its calls then get to finish (default: %(default)s)"),
    ("--keepalive-s", float, 120.0,
     "ping a quiet connection after this long to find dead peers (default: %(default)s)"),
    ("--keepalive-timeout-s", float, 20.0,
     "close it if the ping is not answered within this (default: %(default)s)"),
    ("--min-client-ping-s", float, 20.0,
     "clients may ping at most this often; faster pings close the connection "
     "(default: %(default)s)"),
    ("--handshake-s", float, 10.0,
     "time a new connection gets for TLS and the HTTP/2 preface (default: %(default)s)"),
    ("--stream-idle-s", float, 300.0,
     "close a stream with no request for this long (UNAVAILABLE; clients reopen it) "
     "(default: %(default)s)"),
    ("--unary-deadline-s", float, 30.0,
     "the server's deadline for a unary call, body included, when the client's is longer "
     "or unset (default: %(default)s)"),
    ("--max-health-watches", int, 1000,
     "open grpc.health.v1 Watch streams (default: %(default)s)"),
]  # fmt: skip


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "serve",
        help="run the policy server for a bundle",
        description="Serve a policy bundle over gRPC (splitedge.v1.Policy, with "
        "grpc.health.v1 and reflection): split clients send features, raw clients "
        "send frames. Blocks until SIGTERM, SIGHUP or Ctrl-C, then drains and exits 0.",
    )
    p.add_argument("--bundle", type=Path, required=True, help="policy bundle directory or .tar")
    p.add_argument(
        "--public-key",
        type=Path,
        default=None,
        help="ed25519 public key: refuse to start unless the bundle carries a valid signature "
        "by it (default: hashes checked, signature not required)",
    )
    p.add_argument(
        "--host",
        default="127.0.0.1",
        help="address to listen on; 0.0.0.0 for every interface (default: %(default)s)",
    )
    p.add_argument("--port", type=int, required=True, help="TCP port; 0 picks a free one")
    p.add_argument(
        "--max-batch",
        type=int,
        default=64,
        help="most requests per onnxruntime call (default: %(default)s)",
    )
    p.add_argument(
        "--max-delay-ms",
        type=float,
        default=0.0,
        help="how long a request may wait for others to batch with; 0 = take what "
        "is queued, never wait (default: %(default)s)",
    )
    p.add_argument(
        "--workers",
        type=int,
        default=32,
        help="threads decoding PNG/JPEG frames; calls and streams need none (default: %(default)s)",
    )
    p.add_argument(
        "--grace-s",
        type=float,
        default=5.0,
        help="time in-flight calls get to finish on shutdown (default: %(default)s)",
    )
    p.add_argument("--tls-cert", type=Path, help="PEM server certificate chain: serve over TLS")
    p.add_argument("--tls-key", type=Path, help="PEM private key of --tls-cert")
    p.add_argument(
        "--client-ca",
        type=Path,
        help="PEM CA that signed the device certificates: mutual TLS (needs --tls-cert)",
    )
    p.add_argument(
        "--tokens",
        type=Path,
        help="per-device bearer tokens file (from `splitedge certs`): calls need a valid one, "
        "checked before a request's body is read",
    )
    limits = p.add_argument_group("limits (each bounds what one client can hold)")
    for flag, kind, default, text in LIMITS:
        limits.add_argument(flag, type=kind, default=default, help=text)
    m = p.add_argument_group("metrics and probes")
    m.add_argument(
        "--metrics-port",
        type=int,
        default=None,
        help="serve Prometheus /metrics, /ready (503 while draining) and /live over HTTP "
        "on this port (0 = a free port; default: off)",
    )
    m.add_argument(
        "--metrics-host",
        default="127.0.0.1",
        help="address of the metrics endpoint (default: %(default)s: this machine only)",
    )
    m.add_argument(
        "--metrics-token",
        type=Path,
        help="file holding a bearer token that /metrics requires (default: none)",
    )
    m.add_argument(
        "--metrics-tls",
        action="store_true",
        help="serve the metrics endpoint over HTTPS with --tls-cert/--tls-key",
    )
    m.add_argument(
        "--health-port",
        type=int,
        default=None,
        help="also serve grpc.health.v1 alone in plaintext on this port, for probes that "
        "cannot speak TLS (service 'liveness' stays SERVING while draining; default: off)",
    )
    g = p.add_argument_group("logging")
    g.add_argument(
        "--log-level",
        default="info",
        choices=("debug", "info", "warning", "error"),
        help="server log verbosity, to stderr (default: %(default)s)",
    )
    g.add_argument("--log-json", action="store_true", help="log one JSON object per line")
    p.add_argument("--json", action="store_true", help="print the startup line as JSON")
    p.set_defaults(func=run)


def config_from_args(args: argparse.Namespace) -> Any:
    """The ServerConfig these parsed `serve` options describe (a SplitedgeError if invalid)."""
    from server.config import ServerConfig
    from splitedge.errors import SplitedgeError

    limits = {
        flag[2:].replace("-", "_"): getattr(args, flag[2:].replace("-", "_")) for flag, *_ in LIMITS
    }
    try:
        return ServerConfig(
            bundle=args.bundle,
            host=args.host,
            port=args.port,
            max_batch=args.max_batch,
            max_delay_ms=args.max_delay_ms,
            workers=args.workers,
            grace_s=args.grace_s,
            tls_cert=args.tls_cert,
            tls_key=args.tls_key,
            client_ca=args.client_ca,
            tokens=args.tokens,
            metrics_port=args.metrics_port,
            metrics_host=args.metrics_host,
            metrics_token=args.metrics_token,
            metrics_tls=args.metrics_tls,
            health_port=args.health_port,
            log_level=args.log_level,
            log_json=args.log_json,
            **limits,
        )
    except ValueError as e:
        raise SplitedgeError(f"bad server option: {e}") from e


def run(args: argparse.Namespace) -> int:
    from server.app import serve
    from server.logs import configure

    if args.public_key is not None:  # an unsigned or edited bundle is refused before listening
        from splitedge.bundle import load_bundle

        load_bundle(args.bundle, verify=True, public_key=args.public_key)
    cfg = config_from_args(args)
    configure(cfg.log_level, cfg.log_json)

    def ready(servicer: Any, server: Any) -> None:
        m, port = servicer.models, server.port
        security = "mtls" if cfg.client_ca else "tls" if cfg.tls else "plaintext"
        scheme = "https" if cfg.metrics_tls else "http"
        metrics = (
            f"{scheme}://{cfg.metrics_host}:{server.metrics_port}/metrics"
            if server.metrics_port
            else None
        )
        result = {
            "name": m.name,
            "version": m.version,
            "encoder_digest": m.digest,
            "host": cfg.host,
            "port": port,
            "address": f"{cfg.host}:{port}",
            "health": True,
            "reflection": True,
            "security": security,
            "tokens": cfg.tokens is not None,
            "metrics": metrics,
            "health_port": server.health_port,
            "max_request_bytes": server.max_request,
            "max_connections": server.max_connections,
        }
        extras = [{"mtls": "mutual TLS", "tls": "TLS"}[security]] if security != "plaintext" else []
        extras += ["device tokens"] if cfg.tokens is not None else []
        extras += [f"metrics {metrics}"] if metrics else []
        extras += [f"plaintext health on port {server.health_port}"] if server.health_port else []
        emit(
            result,
            args.json,
            f"serving {m.name} {m.version} (encoder {m.digest[:12]}) on "
            f"{cfg.host}:{port} — health and reflection on"
            + (f"; {', '.join(extras)}" if extras else ""),
        )
        sys.stdout.flush()  # whoever started us may be waiting for this line on a pipe

    return serve(cfg, on_ready=ready)
