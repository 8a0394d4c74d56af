"""The metrics endpoint: Prometheus /metrics, /ready and /live over HTTP/1.1 (or HTTPS).

One asyncio loop on one thread serves every connection, so 1,000 idle connections cost file
descriptors, not threads: at most `max_connections` are open at once (more are closed as
they arrive) and each gets `timeout_s` to send its request, which may be at most 8 KiB.
/metrics needs `Authorization: Bearer <token>` when a token is set; /ready (503 once the
server drains, so a load balancer stops routing to it) and /live stay open for probes and
say nothing about the bundle.
"""

from __future__ import annotations

import asyncio
import errno
import hmac
import logging
import socket
import ssl
import threading
from collections.abc import Callable

from splitedge.errors import SplitedgeError

log = logging.getLogger(__name__)
MAX_HEAD_BYTES = 8 << 10
REASONS = {200: "OK", 400: "Bad Request", 401: "Unauthorized", 404: "Not Found",
           405: "Method Not Allowed", 503: "Service Unavailable"}  # fmt: skip
PROMETHEUS_TYPE = "text/plain; version=0.0.4; charset=utf-8"


def bind_failure(host: str, port: int, error: OSError | None, flag: str) -> SplitedgeError:
    """One line naming why host:port cannot be listened on (probing with a plain socket when
    the error came from gRPC, which does not say)."""
    if error is None:
        try:
            family = socket.AF_INET6 if ":" in host else socket.AF_INET
            with socket.socket(family, socket.SOCK_STREAM) as probe:
                probe.bind((host.strip("[]"), port))
        except OSError as e:
            error = e
    where = f"{host}:{port}"
    code = error.errno if error is not None else None
    if code == errno.EADDRINUSE:
        why = f"the port is in use; pick another with {flag}"
    elif code == errno.EACCES:
        why = (
            "permission denied: ports below 1024 need root or CAP_NET_BIND_SERVICE; "
            f"pick a port above 1024 with {flag}"
        )
    elif code in (errno.EADDRNOTAVAIL, socket.EAI_NONAME, socket.EAI_AGAIN):
        why = "no such address on this machine; check the host"
    elif error is not None:
        why = error.strerror or str(error)
    else:
        why = f"bind failed; pick another port with {flag}"
    return SplitedgeError(f"cannot listen on {where} ({why})")


class MetricsEndpoint:
    """GET /metrics, /ready, /live on its own event-loop thread."""

    def __init__(
        self,
        render: Callable[[], bytes],
        ready: Callable[[], bool],
        token: str | None = None,
        tls: ssl.SSLContext | None = None,
        max_connections: int = 64,
        timeout_s: float = 5.0,
    ):
        self.render, self.ready, self.token, self.tls = render, ready, token, tls
        self.max_connections, self.timeout_s = max_connections, timeout_s
        self.connections = 0
        self.loop = asyncio.new_event_loop()
        self._server: asyncio.Server | None = None
        self._thread = threading.Thread(
            target=self.loop.run_forever, name="metrics-http", daemon=True
        )

    def start(self, host: str, port: int) -> int:
        """Listen on host:port (0 = a free port) and return the port; SplitedgeError naming the
        cause if it cannot."""
        self._thread.start()
        start = asyncio.start_server(
            self._serve,
            host,
            port,
            ssl=self.tls,
            ssl_handshake_timeout=self.timeout_s if self.tls else None,
            limit=MAX_HEAD_BYTES,
            reuse_address=True,
        )
        try:
            self._server = asyncio.run_coroutine_threadsafe(start, self.loop).result(30)
        except OSError as e:
            self.close()
            raise bind_failure(host, port, e, "--metrics-port") from None
        return int(self._server.sockets[0].getsockname()[1])

    def close(self) -> None:
        """Stop listening, drop open connections, stop the thread."""
        if self.loop.is_closed():
            return
        if self._server is not None:
            server = self._server

            async def shut() -> None:
                server.close()
                await asyncio.sleep(0)

            asyncio.run_coroutine_threadsafe(shut(), self.loop).result(10)
        self.loop.call_soon_threadsafe(self.loop.stop)
        if self._thread.is_alive():
            self._thread.join(10)
        self.loop.close()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self.connections >= self.max_connections:
            writer.transport.abort()  # over the cap: closed before a byte is read
            return
        self.connections += 1
        try:
            try:
                head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), self.timeout_s)
            except (asyncio.TimeoutError, asyncio.IncompleteReadError, asyncio.LimitOverrunError,
                    ConnectionError, ssl.SSLError):  # fmt: skip
                return
            status, body, kind = self._answer(head)
            writer.write(
                f"HTTP/1.1 {status} {REASONS[status]}\r\nContent-Type: {kind}\r\n"
                f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n".encode()
                + body
            )
            try:
                await asyncio.wait_for(writer.drain(), self.timeout_s)
            except (asyncio.TimeoutError, ConnectionError):
                return
        finally:
            self.connections -= 1
            writer.close()

    def _answer(self, head: bytes) -> tuple[int, bytes, str]:
        text = "text/plain; charset=utf-8"
        lines = head.decode("latin-1").split("\r\n")
        parts = lines[0].split(" ")
        if len(parts) != 3:
            return 400, b"bad request line\n", text
        method, path = parts[0], parts[1].split("?", 1)[0]
        if method != "GET":
            return 405, b"GET only\n", text
        if path == "/live":
            return 200, b"live\n", text
        if path == "/ready":
            return (200, b"ready\n", text) if self.ready() else (503, b"draining\n", text)
        if path != "/metrics":
            return 404, b"try /metrics, /ready or /live\n", text
        if self.token is not None and not self._authorized(lines[1:]):
            return 401, b"send 'Authorization: Bearer <metrics token>'\n", text
        return 200, self.render(), PROMETHEUS_TYPE

    def _authorized(self, headers: list[str]) -> bool:
        assert self.token is not None
        for line in headers:
            name, _, value = line.partition(":")
            if name.strip().lower() == "authorization":
                scheme, _, token = value.strip().partition(" ")
                return scheme.lower() == "bearer" and hmac.compare_digest(
                    token.strip().encode(), self.token.encode()
                )
        return False
