"""Who may call: TLS / mutual-TLS credentials from files, per-device bearer tokens in an interceptor.

The tokens file has one device per line, ``<device-id> sha256:<hex of the token>`` (``#``
comments allowed), so the server never stores a device's secret; `splitedge certs` writes it.
A client sends ``authorization: Bearer <token>`` metadata. With mutual TLS as well, the
token must belong to the device named in the client certificate's common name, so a stolen
token is useless without that device's key. Health checks stay open (probes carry no token).
"""

from __future__ import annotations

import hashlib
import inspect
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import Any

import grpc

from server.config import ServerConfig
from server.errors import Kind, RequestError
from server.status import code_for
from splitedge.errors import SplitedgeError

TOKEN_HASH_PREFIX = "sha256:"
OPEN_SERVICES = ("/grpc.health.v1.Health/",)


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


class AuthInterceptor(grpc.aio.ServerInterceptor):
    """Refuse calls without a valid device token (UNAUTHENTICATED); health checks stay open."""

    def __init__(
        self,
        tokens: TokenTable,
        mutual_tls: bool,
        on_refused: Callable[[str, str], None] | None = None,
    ):
        self.tokens, self.mutual_tls = tokens, mutual_tls
        self._on_refused = on_refused  # (method, code name), e.g. the metrics

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(details)
        method = details.method  # type: ignore[attr-defined]
        if handler is None or method.startswith(OPEN_SERVICES):
            return handler
        return _guarded(handler, lambda context: self._check(method, context))

    async def _check(self, method: str, context: grpc.aio.ServicerContext) -> None:
        try:
            device = self.tokens.device(context.invocation_metadata() or ())
            if self.mutual_tls and certificate_name(context) != device:
                raise RequestError(
                    Kind.UNAUTHENTICATED,
                    f"token of device {device!r} used with the certificate of "
                    f"{certificate_name(context)!r}; each device uses its own",
                )
        except RequestError as e:
            code = code_for(e.kind)
            if self._on_refused is not None:
                self._on_refused(method.rsplit("/", 1)[-1], code.name)
            await context.abort(code, e.message)


def _guarded(
    handler: grpc.RpcMethodHandler, check: Callable[[Any], Awaitable[None]]
) -> grpc.RpcMethodHandler:
    """The same handler, with `check(context)` awaited before its behaviour runs."""
    kinds = {
        (False, False): ("unary_unary", grpc.unary_unary_rpc_method_handler),
        (False, True): ("unary_stream", grpc.unary_stream_rpc_method_handler),
        (True, False): ("stream_unary", grpc.stream_unary_rpc_method_handler),
        (True, True): ("stream_stream", grpc.stream_stream_rpc_method_handler),
    }
    attr, make = kinds[(handler.request_streaming, handler.response_streaming)]
    behavior = getattr(handler, attr)
    if inspect.isasyncgenfunction(behavior):

        async def stream(arg: Any, context: Any) -> Any:
            await check(context)
            async for item in behavior(arg, context):
                yield item

        wrapped: Any = stream
    else:

        async def call(arg: Any, context: Any) -> Any:
            await check(context)
            return await behavior(arg, context)

        wrapped = call
    return make(  # type: ignore[no-any-return]
        wrapped,
        request_deserializer=handler.request_deserializer,
        response_serializer=handler.response_serializer,
    )
