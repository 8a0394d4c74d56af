"""Who may call: TLS / mutual-TLS credentials from files, per-device bearer tokens (checked
by server/guard.py from a call's headers, before its body is read).

The tokens file has one device per line, ``<device-id> sha256:<hex of the token>`` (``#``
comments allowed), so the server never stores a device's secret; `splitedge certs` writes it.
A client sends ``authorization: Bearer <token>`` metadata. With mutual TLS as well, the
token must belong to the device named in the client certificate's common name, so a stolen
token is useless without that device's key. Health checks stay open (probes carry no token).
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import grpc

from server.config import ServerConfig
from server.errors import Kind, RequestError
from splitedge.errors import SplitedgeError

TOKEN_HASH_PREFIX = "sha256:"


def hash_token(token: str) -> str:
    """What the tokens file stores for a token."""
    return TOKEN_HASH_PREFIX + hashlib.sha256(token.encode()).hexdigest()


def _read(path: Path, what: str) -> bytes:
    try:
        return path.read_bytes()
    except OSError as e:
        raise SplitedgeError(
            f"cannot read the {what} {path} ({e.strerror}); create it with `splitedge certs`"
        ) from e


def server_credentials(cfg: ServerConfig) -> grpc.ServerCredentials | None:
    """TLS credentials for cfg (mutual when client_ca is set), or None for plaintext."""
    if cfg.tls_cert is None or cfg.tls_key is None:
        return None
    pair = (_read(cfg.tls_key, "TLS key"), _read(cfg.tls_cert, "TLS certificate"))
    ca = _read(cfg.client_ca, "client CA") if cfg.client_ca is not None else None
    return grpc.ssl_server_credentials(
        [pair], root_certificates=ca, require_client_auth=ca is not None
    )


class TokenTable:
    """Token hashes -> device ids, loaded from a tokens file."""

    def __init__(self, devices_by_hash: dict[str, str]):
        self._devices = devices_by_hash

    def __len__(self) -> int:
        return len(self._devices)

    @classmethod
    def load(cls, path: Path) -> TokenTable:
        """Parse a tokens file; SplitedgeError naming the line if it is malformed."""
        table: dict[str, str] = {}
        for n, line in enumerate(_read(path, "tokens file").decode().splitlines(), 1):
            fields = line.split("#", 1)[0].split()
            if not fields:
                continue
            if len(fields) != 2 or not fields[1].startswith(TOKEN_HASH_PREFIX):
                raise SplitedgeError(
                    f"{path}:{n}: expected '<device-id> sha256:<hex>', got {line.strip()!r}"
                )
            table[fields[1].lower()] = fields[0]
        if not table:
            raise SplitedgeError(f"{path} lists no device tokens; add some with `splitedge certs`")
        return cls(table)

    def device(self, metadata: Sequence[tuple[str, Any]]) -> str:
        """The device whose bearer token the call carries, else an UNAUTHENTICATED RequestError."""
        values = [v for k, v in metadata if k == "authorization"]
        if not values:
            raise RequestError(
                Kind.UNAUTHENTICATED, "no bearer token; send 'authorization: Bearer <token>'"
            )
        value = values[0].decode() if isinstance(values[0], bytes) else str(values[0])
        scheme, _, token = value.partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            raise RequestError(Kind.UNAUTHENTICATED, "authorization must be 'Bearer <token>'")
        device = self._devices.get(hash_token(token.strip()))
        if device is None:
            raise RequestError(Kind.UNAUTHENTICATED, "unknown or revoked token")
        return device


def certificate_name(context: grpc.aio.ServicerContext) -> str | None:
    """The common name of the client's verified certificate (mutual TLS), if any."""
    names = (context.auth_context() or {}).get("x509_common_name") or []
    return names[0].decode() if names else None
