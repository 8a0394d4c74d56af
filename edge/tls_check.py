"""Why did the server refuse this device? A stdlib TLS handshake that names the reason.

A TLS credential problem (no client certificate under mutual TLS, a certificate from
another CA, a server the device does not trust, plaintext to a TLS port) fails the
handshake before any RPC exists, so gRPC can only report UNAVAILABLE, often as "Socket
closed" - the same words as a server that crashed. When a connection fails, the client
replays the handshake with Python's `ssl` using the same credentials and reads the
alert the server sent, so the device can say UNAUTHENTICATED and why, and stop retrying
something no retry can fix. gRPC exposes no such hook, hence this small file.
"""

from __future__ import annotations

import socket
import ssl
from pathlib import Path

from edge.channel import ChannelSecurity, resolve_target

# The HTTP/2 client preface and an empty SETTINGS frame: after a TLS 1.3 handshake the
# server checks the client's certificate, so its verdict (an alert or a SETTINGS frame)
# only arrives once the client has said something.
H2_PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + b"\x00\x00\x00\x04\x00\x00\x00\x00\x00"

# OpenSSL alert reasons a server sends when it rejects the client's certificate
CLIENT_CERT_ALERTS = {
    "TLSV13_ALERT_CERTIFICATE_REQUIRED": "the server requires a device certificate (mutual "
    "TLS) and none was given; set SPLITEDGE_CERT and SPLITEDGE_KEY",
    "TLSV1_ALERT_UNKNOWN_CA": "the server does not trust this device's certificate (it is "
    "not signed by the fleet's CA)",
    "SSLV3_ALERT_BAD_CERTIFICATE": "the server rejected this device's certificate",
    "SSLV3_ALERT_CERTIFICATE_EXPIRED": "the server says this device's certificate expired",
    "SSLV3_ALERT_CERTIFICATE_REVOKED": "the server says this device's certificate is revoked",
    "TLSV1_ALERT_DECRYPT_ERROR": "the server could not verify this device's certificate",
    "SSLV3_ALERT_HANDSHAKE_FAILURE": "the server refused the TLS handshake",
}


class ClosedAfterHandshake(ConnectionError):
    """The server hung up right after the handshake, before its HTTP/2 SETTINGS (which a
    gRPC server sends first): BoringSSL's way of refusing a client certificate, no alert."""


def first_address(server: str) -> tuple[str, int] | None:
    """(host, port) of the first replica a target names, or None for unix sockets etc."""
    target = resolve_target(server)
    if target.startswith(("ipv4:", "ipv6:")):
        target = target.split(":", 1)[1].split(",")[0]
    elif target.startswith("dns:"):
        target = target.rsplit("/", 1)[-1]
    elif ":" not in target or target.startswith(("unix", "xds:")):
        return None
    host, _, port = target.rpartition(":")
    try:
        return host.strip("[]"), int(port)
    except ValueError:
        return None


def _context(security: ChannelSecurity) -> ssl.SSLContext:
    ctx = ssl.create_default_context(cafile=str(security.ca) if security.ca else None)
    if security.cert is not None and security.key is not None:
        ctx.load_cert_chain(str(Path(security.cert)), str(Path(security.key)))
    ctx.set_alpn_protocols(["h2"])
    return ctx


def _handshake(
    address: tuple[str, int],
    ctx: ssl.SSLContext,
    server_name: str,
    timeout: float,
    exchange: bool = True,
) -> None:
    """Connect, handshake and (exchange) trade HTTP/2 prefaces; raises what the server said."""
    with socket.create_connection(address, timeout=timeout) as raw:
        with ctx.wrap_socket(raw, server_hostname=server_name) as tls:
            if not exchange:  # the server completed a TLS handshake: that is all we ask
                return
            tls.sendall(H2_PREFACE)
            if not tls.recv(1):
                raise ClosedAfterHandshake()


def diagnose(server: str, security: ChannelSecurity, timeout: float = 3.0) -> str | None:
    """The authentication reason the server at `server` refuses `security`, or None when
    the handshake succeeds or fails for a reason that is not about credentials (server
    down, network, timeout)."""
    address = first_address(server)
    if address is None:
        return None
    host = security.server_name or address[0]
    if not security.uses_tls:
        probe = ssl.create_default_context()
        probe.check_hostname, probe.verify_mode = False, ssl.CERT_NONE
        probe.set_alpn_protocols(["h2"])
        try:
            _handshake(address, probe, host, timeout, exchange=False)
        except (OSError, ssl.SSLError):
            return None  # not a TLS server either: an ordinary connection problem
        return "the server speaks TLS and this device connected in plaintext; give the " \
            "fleet's CA (SPLITEDGE_CA)"  # fmt: skip
    try:
        _handshake(address, _context(security), host, timeout)
    except ClosedAfterHandshake:
        if security.cert is None:
            return CLIENT_CERT_ALERTS["TLSV13_ALERT_CERTIFICATE_REQUIRED"]
        return "the server refused this device's certificate (not signed by a CA it trusts, " \
            "or revoked)"  # fmt: skip
    except ssl.SSLCertVerificationError as e:
        return f"this device does not trust the server's certificate for {host!r}: " \
            f"{e.verify_message}"  # fmt: skip
    except ssl.SSLError as e:
        reason = str(e.reason or "")
        if reason in CLIENT_CERT_ALERTS:
            return CLIENT_CERT_ALERTS[reason]
        if reason == "WRONG_VERSION_NUMBER":
            return None  # a plaintext server: not a credential problem
        return f"TLS handshake failed ({reason or e})"
    except OSError:
        return None
    return None
