"""The gate every call passes first: a grpc.aio interceptor, which runs on a call's headers
before gRPC reads its body.

- Auth before work: with a tokens file, a Policy or reflection call without a valid bearer
  token is refused from its headers alone (UNAUTHENTICATED, counted); the refusal handler
  never reads the body, so a held or huge body costs no memory. Under mutual TLS the token
  must also belong to the certificate's device (checked before the body is read, too).
- Unary calls become "read one message" calls, so the server's default deadline covers
  reading the body (a trickled body is cut off) as well as the answer.
- A message that is not valid protobuf is INVALID_ARGUMENT with a short message (gRPC's own
  answer would be UNKNOWN with the exception's text), unary or mid-stream.
- Iterator-driven streams (reflection) are closed after stream_idle_s without a request;
  ActStream does the same itself (server/servicer.py).
- Late in a drain (`closing`), new calls are refused UNAVAILABLE from their headers, so that
  clients go elsewhere before the listener stops (server/app.py).
"""

from __future__ import annotations

import asyncio
import inspect
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import grpc
from google.protobuf.message import DecodeError

from server.auth import TokenTable, certificate_name
from server.errors import DRAINING, Kind, RequestError, echo
from server.reaper import Reaper
from server.status import code_for

OPEN_SERVICES = ("/grpc.health.v1.Health/",)  # probes carry no token
Refused = Callable[[str, RequestError], None]  # (method's short name, error): count and log


def short_name(method: str) -> str:
    """'/splitedge.v1.Policy/Act' -> 'Act'."""
    return method.rsplit("/", 1)[-1]


class Guard(grpc.aio.ServerInterceptor):
    """Auth from headers, deadlines, idle limits and decode errors for every call."""

    def __init__(
        self,
        reaper: Reaper,
        unary_deadline_s: float,
        stream_idle_s: float,
        refused: Refused,
        tokens: TokenTable | None = None,
        mutual_tls: bool = False,
    ):
        self.reaper, self.tokens, self.mutual_tls = reaper, tokens, mutual_tls
        self.unary_deadline_s, self.stream_idle_s = unary_deadline_s, stream_idle_s
        self._refused = refused
        self._handlers: dict[str, grpc.RpcMethodHandler] = {}  # known methods only
        self.closing = False  # set late in a drain: new calls get UNAVAILABLE (retry elsewhere)
        self.last_call = 0.0  # loop time of the latest call to arrive

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        method: str = details.method  # type: ignore[attr-defined]
        self.last_call = asyncio.get_running_loop().time()
        if self.closing and not method.startswith(OPEN_SERVICES):
            return self._refusal(method, RequestError(Kind.UNAVAILABLE, DRAINING))
        guarded = self.tokens is not None and not method.startswith(OPEN_SERVICES)
        if guarded:
            try:
                self.tokens.device(details.invocation_metadata or ())  # type: ignore[union-attr,attr-defined]
            except RequestError as e:
                return self._refusal(method, e)
        handler = self._handlers.get(method)
        if handler is None:
            found = await continuation(details)
            if found is None:
                return None  # type: ignore[return-value]  # gRPC answers UNIMPLEMENTED
            handler = self._handlers[method] = self._wrap(method, found, guarded)
        return handler

    def _refusal(self, method: str, error: RequestError) -> grpc.RpcMethodHandler:
        self._refused(short_name(method), error)
        code = code_for(error.kind)

        async def refuse(request_iterator: Any, context: grpc.aio.ServicerContext) -> None:
            await context.abort(code, error.message)  # the body is never read

        return grpc.stream_unary_rpc_method_handler(refuse)

    async def _refuse(
        self, method: str, context: grpc.aio.ServicerContext, error: RequestError
    ) -> None:
        self._refused(short_name(method), error)
        await context.abort(code_for(error.kind), error.message)

    def _check_peer(self, context: grpc.aio.ServicerContext) -> None:
        """Under mutual TLS, the token's device must be the certificate's."""
        assert self.tokens is not None
        device = self.tokens.device(context.invocation_metadata() or ())
        name = certificate_name(context)
        if name != device:
            raise RequestError(
                Kind.UNAUTHENTICATED,
                f"token of device {echo(device)!r} used with the certificate of "
                f"{echo(name)!r}; each device uses its own",
            )

    def _wrap(
        self, method: str, handler: grpc.RpcMethodHandler, guarded: bool
    ) -> grpc.RpcMethodHandler:
        check_peer = guarded and self.mutual_tls
        deserialize = _safe_deserializer(handler.request_deserializer)
        serialize = handler.response_serializer
        if handler.request_streaming:
            behavior = handler.stream_stream or handler.stream_unary
        else:
            behavior = handler.unary_stream or handler.unary_unary
        if not (inspect.iscoroutinefunction(behavior) or inspect.isasyncgenfunction(behavior)):
            return handler  # not ours to change (no sync handlers are registered)
        deadline, idle = self.unary_deadline_s, self.stream_idle_s

        async def call(request_iterator: Any, context: grpc.aio.ServicerContext) -> Any:
            task = asyncio.current_task()
            assert task is not None
            try:
                if check_peer:
                    self._check_peer(context)
                if handler.request_streaming:
                    arg = self._idle_limited(request_iterator, task, idle)
                else:
                    self.reaper.arm(task, deadline)
                    arg = await context.read()
                    if arg is grpc.aio.EOF:
                        raise RequestError(Kind.INVALID, "the call ended before its request")
                    if handler.response_streaming:
                        self.reaper.disarm(task)  # a server stream may last (health Watch)
                if not handler.response_streaming:
                    return await behavior(arg, context)
                if inspect.isasyncgenfunction(behavior):
                    async for reply in behavior(arg, context):
                        await context.write(reply)
                else:
                    await behavior(arg, context)
                return None
            except RequestError as e:
                await self._refuse(method, context, e)
            except asyncio.CancelledError:
                if not self.reaper.reaped(task):
                    raise  # the client went away, or the server is stopping
                if handler.request_streaming:
                    error = RequestError(
                        Kind.IDLE, f"no request for {idle:g} s; open a new stream when needed"
                    )
                else:
                    error = RequestError(
                        Kind.DEADLINE, f"call not done within the server's {deadline:g} s deadline"
                    )
                await self._refuse(method, context, error)
            finally:
                self.reaper.disarm(task)
            return None

        make = (
            grpc.stream_stream_rpc_method_handler
            if handler.response_streaming
            else grpc.stream_unary_rpc_method_handler
        )
        return make(call, request_deserializer=deserialize, response_serializer=serialize)  # type: ignore[no-any-return]

    async def _idle_limited(
        self, requests: AsyncIterator[Any], task: asyncio.Task[Any], idle_s: float
    ) -> AsyncIterator[Any]:
        """The requests of a stream; the reaper ends the call after idle_s without one."""
        iterator = requests.__aiter__()
        while True:
            self.reaper.arm(task, idle_s)
            try:
                request = await iterator.__anext__()
            except StopAsyncIteration:
                return
            finally:
                self.reaper.disarm(task)
            yield request


def _safe_deserializer(parse: Callable[[bytes], Any] | None) -> Callable[[bytes], Any] | None:
    """parse, raising an INVALID RequestError (not DecodeError: gRPC would answer UNKNOWN)."""
    if parse is None:
        return None
    message = getattr(getattr(parse, "__self__", None), "DESCRIPTOR", None)
    what = message.full_name if message is not None else "request"

    def deserialize(data: bytes) -> Any:
        try:
            return parse(data)
        except DecodeError:
            raise RequestError(
                Kind.INVALID, f"{len(data)} bytes that are not a valid {what} message"
            ) from None

    return deserialize
