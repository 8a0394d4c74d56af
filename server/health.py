"""grpc.health.v1 for the grpc.aio server, whose Watch streams end once they report NOT_SERVING.

Clients that use gRPC's client-side health checking keep a Watch open on every connection;
if those streams stayed open, every shutdown would wait out the whole grace period for them.
"""

from __future__ import annotations

import asyncio
import functools

import grpc
from grpc_health.v1 import health_pb2 as hpb
from grpc_health.v1 import health_pb2_grpc

SERVING, NOT_SERVING = hpb.HealthCheckResponse.SERVING, hpb.HealthCheckResponse.NOT_SERVING


class Health(health_pb2_grpc.HealthServicer):
    """Serving status per service name ("" = the whole server); all NOT_SERVING at shutdown."""

    def __init__(self) -> None:
        self._status: dict[str, int] = {"": SERVING}
        self._version = 0  # bumped on every change, so a watcher never misses one
        self._changed: asyncio.Condition | None = None  # made on the event loop, on first use
        self._shutting_down = False

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
        """Every service NOT_SERVING for good; Watch streams say so, then end."""
        self._shutting_down = True
        for service in self._status:
            self._status[service] = NOT_SERVING
        await self._notify()

    async def _notify(self) -> None:
        async with self._condition():
            self._version += 1
            self._condition().notify_all()

    def _changed_since(self, version: int) -> bool:
        return self._version != version

    async def Check(
        self, request: hpb.HealthCheckRequest, context: grpc.aio.ServicerContext
    ) -> hpb.HealthCheckResponse:  # noqa: N802
        status = self._status.get(request.service)
        if status is None:
            await context.abort(grpc.StatusCode.NOT_FOUND, f"unknown service {request.service!r}")
        return hpb.HealthCheckResponse(status=status)

    async def Watch(
        self, request: hpb.HealthCheckRequest, context: grpc.aio.ServicerContext
    ) -> None:  # noqa: N802
        seen, last = -1, None
        while True:
            async with self._condition():
                await self._condition().wait_for(functools.partial(self._changed_since, seen))
                seen = self._version
                status = self._status.get(request.service, hpb.HealthCheckResponse.SERVICE_UNKNOWN)
                ending = self._shutting_down
            if status != last:
                await context.write(hpb.HealthCheckResponse(status=status))
                last = status
            if ending:
                return
