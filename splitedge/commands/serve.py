"""`splitedge serve`: run the policy server for one bundle until SIGTERM or Ctrl-C."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from splitedge.output import emit


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "serve",
        help="run the policy server for a bundle",
        description="Serve a policy bundle over gRPC (splitedge.v1.Policy, with "
        "grpc.health.v1 and reflection): split clients send features, raw clients "
        "send frames. Blocks until SIGTERM or Ctrl-C, then drains and exits 0.",
    )
    p.add_argument("--bundle", type=Path, required=True, help="policy bundle directory or .tar")
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
        help="per-device bearer tokens file (from `splitedge certs`): calls need a valid one",
    )
    p.add_argument(
        "--metrics-port",
        type=int,
        default=None,
        help="serve Prometheus metrics at http://HOST:PORT/metrics (0 = a free port; default: off)",
    )
    p.add_argument("--json", action="store_true", help="print the startup line as JSON")
    p.set_defaults(func=run)


def config_from_args(args: argparse.Namespace) -> Any:
    """The ServerConfig these parsed `serve` options describe (a SplitedgeError if invalid)."""
    from server.config import ServerConfig
    from splitedge.errors import SplitedgeError

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
        )
    except ValueError as e:
        raise SplitedgeError(f"bad server option: {e}") from e


def run(args: argparse.Namespace) -> int:
    from server.app import serve

    cfg = config_from_args(args)

    def ready(servicer: Any, server: Any) -> None:
        m, port = servicer.models, server.port
        security = "mtls" if cfg.client_ca else "tls" if cfg.tls else "plaintext"
        metrics = (
            f"http://{cfg.host}:{server.metrics_port}/metrics" if server.metrics_port else None
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
        }
        extras = [{"mtls": "mutual TLS", "tls": "TLS"}[security]] if security != "plaintext" else []
        extras += ["device tokens"] if cfg.tokens is not None else []
        extras += [f"metrics {metrics}"] if metrics else []
        emit(
            result,
            args.json,
            f"serving {m.name} {m.version} (encoder {m.digest[:12]}) on "
            f"{cfg.host}:{port} — health and reflection on"
            + (f"; {', '.join(extras)}" if extras else ""),
        )
        sys.stdout.flush()  # whoever started us may be waiting for this line on a pipe

    return serve(cfg, on_ready=ready)
