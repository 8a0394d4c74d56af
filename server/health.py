"""grpc.health.v1 for the grpc.aio server, whose Watch streams end once they report NOT_SERVING.

Clients that use gRPC's client-side health checking keep a Watch open on every connection;
if those streams stayed open, every shutdown would wait out the whole grace period for them.
Watches are open to anyone (probes carry no token), so at most `max_watches` run at once.

Service "liveness" stays SERVING while draining (until the process exits): point a liveness
probe at it, and readiness at "" or splitedge.v1.Policy, so a draining replica leaves the
load balancer without being restarted.
"""

from __future__ import annotations

import asyncio
import functools
from collections.abc import Callable

import grpc
from grpc_health.v1 import health_pb2 as hpb
from grpc_health.v1 import health_pb2_grpc

from server.errors import Kind, RequestError, echo
from server.status import code_for

SERVING, NOT_SERVING = hpb.HealthCheckResponse.SERVING, hpb.HealthCheckResponse.NOT_SERVING
LIVENESS = "liveness"


class Health(health_pb2_grpc.HealthServicer):
    """Serving status per service name ("" = the whole server); all NOT_SERVING at shutdown
    except LIVENESS."""

    def __init__(
        self,
        max_watches: int = 1000,
        refused: Callable[[str, RequestError], None] | None = None,
    ) -> None:
        self._status: dict[str, int] = {"": SERVING, LIVENESS: SERVING}
        self._version = 0  # bumped on every change, so a watcher never misses one
        self._changed: asyncio.Condition | None = None  # made on the event loop, on first use
        self._shutting_down = False
        self.max_watches, self.watches = max_watches, 0
        self._refused = refused  # (method, error): count and log

    def _condition(self) -> asyncio.Condition:
        if self._changed is None:
            self._changed = asyncio.Condition()
        return self._changed

    async def set(self, service: str, status: int) -> None:
        """Set one service's status (ignored once shutting down)."""
        if not self._shutting_down:
            self._status[service] = status
            await self._notify()

    async def enter_graceful_shutdown(self) -> None:
        """Every service but LIVENESS NOT_SERVING for good; Watch streams say so, then end."""
        self._shutting_down = True
        for service in self._status:
            if service != LIVENESS:
                self._status[service] = NOT_SERVING
        await self._notify()

    async def _notify(self) -> None:
        async with self._condition():
            self._version += 1
            self._condition().notify_all()

    def _changed_since(self, version: int) -> bool:
        return self._version != version

    async def _abort(
        self, context: grpc.aio.ServicerContext, method: str, error: RequestError
    ) -> None:
        if self._refused is not None:
            self._refused(method, error)
        await context.abort(code_for(error.kind), error.message)

    async def Check(
        self, request: hpb.HealthCheckRequest, context: grpc.aio.ServicerContext
    ) -> hpb.HealthCheckResponse:  # noqa: N802
        status = self._status.get(request.service)
        if status is None:
            error = RequestError(Kind.NOT_FOUND, f"unknown service {echo(request.service)!r}")
            await self._abort(context, "Check", error)
        return hpb.HealthCheckResponse(status=status)

    async def Watch(
        self, request: hpb.HealthCheckRequest, context: grpc.aio.ServicerContext
    ) -> None:  # noqa: N802
        if self.watches >= self.max_watches:
            error = RequestError(
                Kind.EXHAUSTED,
                f"{self.watches} health watches open (the limit); use Check, or retry later",
            )
            await self._abort(context, "Watch", error)
        self.watches += 1
        try:
            await self._watch(request, context)
        finally:
            self.watches -= 1

    async def _watch(
        self, request: hpb.HealthCheckRequest, context: grpc.aio.ServicerContext
    ) -> None:
        seen, last = -1, None
        while True:
            async with self._condition():
                await self._condition().wait_for(functools.partial(self._changed_since, seen))
                seen = self._version
                status = self._status.get(request.service, hpb.HealthCheckResponse.SERVICE_UNKNOWN)
                ending = self._shutting_down  # (a LIVENESS watch ends too, still SERVING)
            if status != last:
                await context.write(hpb.HealthCheckResponse(status=status))
                last = status
            if ending:
                return
