"""A few bytes of HTTP/2 by hand, for clients that no gRPC library would be: connections that
say hello and then nothing, calls that send most of a body and hold it.

Only what the hostile tests need: the connection preface, SETTINGS (and its ACK), HEADERS
with literal HPACK fields (no Huffman, no indexing), DATA, and reading whatever frames the
server sends back. See RFC 9113 (HTTP/2) and RFC 7541 (HPACK).
"""

from __future__ import annotations

import selectors
import socket
import ssl
import time
from dataclasses import dataclass

PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
DATA, HEADERS, RST_STREAM, SETTINGS, PING, GOAWAY, WINDOW_UPDATE = 0, 1, 3, 4, 6, 7, 8
END_STREAM, ACK, END_HEADERS = 0x1, 0x1, 0x4


def frame(kind: int, flags: int, stream: int, payload: bytes = b"") -> bytes:
    """One frame: 24-bit length, type, flags, 31-bit stream id, payload."""
    return (
        len(payload).to_bytes(3, "big") + bytes([kind, flags]) + stream.to_bytes(4, "big") + payload
    )


def _integer(value: int, prefix_bits: int = 7) -> bytes:
    """HPACK integer with an N-bit prefix (the flag bits above it are zero)."""
    top = (1 << prefix_bits) - 1
    if value < top:
        return bytes([value])
    out, value = [top], value - top
    while value >= 128:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    return bytes([*out, value])


def header_block(fields: list[tuple[str, str]]) -> bytes:
    """Literal header fields without indexing, new names (0x00 prefix), no Huffman."""
    out = b""
    for name, value in fields:
        n, v = name.encode(), value.encode()
        out += b"\x00" + _integer(len(n)) + n + _integer(len(v)) + v
    return out


def grpc_headers(path: str, authority: str, token: str | None = None, tls: bool = False) -> bytes:
    """The request header block of a gRPC call to `path` ('/pkg.Service/Method')."""
    fields = [
        (":method", "POST"),
        (":scheme", "https" if tls else "http"),
        (":path", path),
        (":authority", authority),
        ("content-type", "application/grpc"),
        ("te", "trailers"),
    ]
    if token is not None:
        fields.append(("authorization", f"Bearer {token}"))
    return header_block(fields)


def grpc_message_prefix(length: int) -> bytes:
    """gRPC's 5-byte length prefix of an uncompressed message."""
    return b"\x00" + length.to_bytes(4, "big")


@dataclass
class Connection:
    """One raw HTTP/2 connection (after preface and SETTINGS exchange)."""

    sock: socket.socket

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def start_call(self, stream: int, block: bytes) -> None:
        self.send(frame(HEADERS, END_HEADERS, stream, block))

    def send_data(self, stream: int, data: bytes, end: bool = False) -> None:
        for i in range(0, max(len(data), 1), 16_384):  # the default SETTINGS_MAX_FRAME_SIZE
            last = i + 16_384 >= len(data)
            self.send(frame(DATA, END_STREAM if end and last else 0, stream, data[i : i + 16_384]))

    def read_frames(self, timeout: float) -> list[tuple[int, int, int, bytes]] | None:
        """Frames (type, flags, stream, payload) that arrive within `timeout` (returning soon
        after the first bytes); None once the server has closed the connection."""
        self.sock.settimeout(timeout)
        buf = b""
        try:
            while True:
                chunk = self.sock.recv(65_536)
                if not chunk:
                    return None
                buf += chunk
                self.sock.settimeout(0.05)  # whatever follows at once
        except (TimeoutError, ssl.SSLWantReadError, BlockingIOError):
            pass
        except (ConnectionError, ssl.SSLError, OSError):
            return None
        return split_frames(buf)[0]

    def close(self) -> None:
        try:
            self.sock.close()
        except OSError:
            pass


Frame = tuple[int, int, int, bytes]  # type, flags, stream, payload


def split_frames(buf: bytes) -> tuple[list[Frame], bytes]:
    """The whole frames at the start of buf, and the bytes of an unfinished one after them."""
    frames = []
    while len(buf) >= 9:
        n = int.from_bytes(buf[:3], "big")
        if len(buf) < 9 + n:
            break
        frames.append(
            (buf[3], buf[4], int.from_bytes(buf[5:9], "big") & 0x7FFFFFFF, buf[9 : 9 + n])
        )
        buf = buf[9 + n :]
    return frames, buf


def watch_until_closed(
    conns: list[Connection], opened: list[float], within_s: float
) -> tuple[list[float | None], list[float | None]]:
    """For each connection, how long after `opened` the server sent GOAWAY and closed it
    (None: not within within_s). One selector watches them all, so every timestamp is taken
    when its bytes arrive, however many connections there are."""
    told: list[float | None] = [None] * len(conns)
    closed: list[float | None] = [None] * len(conns)
    pending = [b""] * len(conns)
    sel = selectors.DefaultSelector()
    for i, conn in enumerate(conns):
        conn.sock.setblocking(False)
        sel.register(conn.sock, selectors.EVENT_READ, i)
    end = time.monotonic() + within_s
    while sel.get_map() and (left := end - time.monotonic()) > 0:
        for key, _ in sel.select(min(left, 1.0)):
            i, now = key.data, time.monotonic() - opened[key.data]
            data, eof = _drain(conns[i].sock)
            frames, pending[i] = split_frames(pending[i] + data)
            if told[i] is None and (eof or any(f[0] == GOAWAY for f in frames)):
                told[i] = now
            if eof:
                closed[i] = now
                sel.unregister(conns[i].sock)
    sel.close()
    return told, closed


def _drain(sock: socket.socket) -> tuple[bytes, bool]:
    """What a non-blocking socket has now, and whether the peer has closed it."""
    data = b""
    try:
        while chunk := sock.recv(65_536):
            data += chunk
        return data, True
    except (BlockingIOError, ssl.SSLWantReadError):
        return data, False
    except (ConnectionError, ssl.SSLError, OSError):
        return data, True


def connect(
    host: str, port: int, tls: ssl.SSLContext | None = None, timeout: float = 30.0
) -> Connection:
    """Open a connection, send the preface and empty SETTINGS, ACK the server's SETTINGS."""
    raw = socket.create_connection((host, port), timeout=timeout)
    sock: socket.socket = tls.wrap_socket(raw, server_hostname="localhost") if tls else raw
    sock.sendall(PREFACE + frame(SETTINGS, 0, 0))
    buf = b""
    while True:  # until the server's (non-ACK) SETTINGS frame
        chunk = sock.recv(65_536)
        if not chunk:
            raise ConnectionError("server closed the connection during the HTTP/2 preface")
        buf += chunk
        acked = False
        while len(buf) >= 9:
            n = int.from_bytes(buf[:3], "big")
            if len(buf) < 9 + n:
                break
            if buf[3] == SETTINGS and not buf[4] & ACK:
                acked = True
            buf = buf[9 + n :]
        if acked:
            sock.sendall(frame(SETTINGS, ACK, 0))
            return Connection(sock)


def tls_client(ca: str, cert: str | None = None, key: str | None = None) -> ssl.SSLContext:
    """A TLS client context for gRPC (ALPN h2), trusting `ca`, with a client certificate."""
    ctx = ssl.create_default_context(cafile=ca)
    ctx.set_alpn_protocols(["h2"])
    if cert is not None:
        ctx.load_cert_chain(cert, key)
    return ctx
