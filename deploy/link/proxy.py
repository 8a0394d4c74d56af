"""LinkProxy: a userspace TCP proxy that makes loopback behave like a link profile."""

from __future__ import annotations

import asyncio
import threading
from types import TracebackType

from deploy.link.model import SerialLink
from deploy.link.pipe import Pipe, Stream
from deploy.link.profiles import LinkProfile
from deploy.link.timing import new_precise_loop, tighten_timer_slack

_START_TIMEOUT_S = 10.0
_CLOSE_TIMEOUT_S = 10.0


class LinkProxy:
    """Forward TCP from a local port to upstream through an emulated link (the `proxy` backend).

    Each direction is one FIFO serial line shared by all connections: a packet read at t
    starts at max(t, line free), takes bytes*8/rate, and arrives delay +- jitter later,
    never before the packet ahead of it on the same connection. A full queue stops
    reading from the sender (a TCP proxy cannot drop bytes; TCP would resend them anyway).
    The TCP handshake itself is not delayed: the kernel completes it on loopback.

    The proxy runs its own event loop in a daemon thread. It shares the GIL with the
    caller, so a caller that keeps the CPU busy in Python delays deliveries; for
    latency measurements run it in its own process (`python -m deploy.link`).
    shape_rate=False applies only delay and jitter, for when a kernel qdisc shapes rate.
    """

    backend = "proxy"
    netns: str | None = None  # clients dial it from this process's namespace

    def __init__(
        self,
        profile: LinkProfile,
        upstream: tuple[str, int],
        listen_host: str = "127.0.0.1",
        seed: int = 0,
        shape_rate: bool = True,
    ):
        self.profile = profile
        self.upstream = upstream
        self.listen_host = listen_host
        self.seed = seed
        self.shape_rate = shape_rate
        self._port: int | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._server: asyncio.Server | None = None
        self._pipes: set[Pipe] = set()
        self._counts = {"bytes_up": 0, "bytes_down": 0, "connections": 0}
        # Header bytes (all segments up, down; data segments up, down) of closed upstream sockets.
        self._ended_headers = [0, 0, 0, 0]
        p = profile
        self._up = SerialLink(
            p.up_kbit if shape_rate else None, p.delay_ms, p.jitter_ms, p.queue_bytes, seed=2 * seed
        )
        self._down = SerialLink(
            p.down_kbit if shape_rate else None,
            p.delay_ms,
            p.jitter_ms,
            p.queue_bytes,
            seed=2 * seed + 1,
        )

    @property
    def address(self) -> str:
        """HOST:PORT that clients connect to instead of the upstream."""
        if self._port is None:
            raise RuntimeError(
                "LinkProxy is not started; call start() or use it as a context manager"
            )
        host = self.listen_host
        if host in ("0.0.0.0", "", "::"):
            host = "127.0.0.1"
        return f"[{host}]:{self._port}" if ":" in host else f"{host}:{self._port}"

    def start(self) -> LinkProxy:
        """Open the listening socket and start forwarding; returns self."""
        if self._thread is not None:
            return self
        loop = new_precise_loop()
        self._loop = loop
        self._thread = threading.Thread(
            target=self._run_loop, args=(loop,), name=f"link-proxy-{self.profile.name}", daemon=True
        )
        self._thread.start()
        try:
            self._port = asyncio.run_coroutine_threadsafe(self._open(), loop).result(
                _START_TIMEOUT_S
            )
        except BaseException:
            self.close()
            raise
        return self

    def close(self) -> None:
        """Stop listening, drop every connection, and end the thread; safe to call twice."""
        loop, thread = self._loop, self._thread
        if loop is None or thread is None:
            return
        if thread.is_alive() and not loop.is_closed():
            try:
                asyncio.run_coroutine_threadsafe(self._shutdown(), loop).result(_CLOSE_TIMEOUT_S)
            finally:
                loop.call_soon_threadsafe(loop.stop)
        thread.join(_CLOSE_TIMEOUT_S)
        self._loop = self._thread = None
        self._port = None

    def stats(self) -> dict[str, int]:
        """Cumulative bytes_up (client -> upstream), bytes_down, connections; open ones; peak queues.

        frames_up/frames_down add the Ethernet/IP/TCP headers of every segment the upstream
        sockets sent/received (TCP_INFO): what a kernel shaper between proxy and upstream meters.
        data_frames_* count only segments that carry data: pure ACKs mostly cross an idle link
        off the critical path, so an exchange's analytic bound leaves them out.
        """
        headers = self._upstream_headers()
        return {
            **self._counts,
            "open_connections": len(self._pipes),
            "queue_peak_up": int(self._up.peak_backlog),
            "queue_peak_down": int(self._down.peak_backlog),
            "frames_up": self._counts["bytes_up"] + headers[0],
            "frames_down": self._counts["bytes_down"] + headers[1],
            "data_frames_up": self._counts["bytes_up"] + headers[2],
            "data_frames_down": self._counts["bytes_down"] + headers[3],
            # What this emulator meters when it shapes the rate itself: payload bytes.
            "link_up": self._counts["bytes_up"],
            "link_down": self._counts["bytes_down"],
            "bound_up": self._counts["bytes_up"],
            "bound_down": self._counts["bytes_down"],
        }

    def _upstream_headers(self) -> list[int]:
        loop = self._loop
        if loop is None or loop.is_closed():
            return list(self._ended_headers)

        async def total() -> list[int]:
            sums = list(self._ended_headers)
            for pipe in self._pipes:
                *counts, header = pipe.upstream.segments()
                sums = [s + n * header for s, n in zip(sums, counts, strict=True)]
            return sums

        return asyncio.run_coroutine_threadsafe(total(), loop).result(_CLOSE_TIMEOUT_S)

    def __enter__(self) -> LinkProxy:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    # --- inside the proxy's event loop -------------------------------------------------

    def _run_loop(self, loop: asyncio.AbstractEventLoop) -> None:
        tighten_timer_slack()
        asyncio.set_event_loop(loop)
        try:
            loop.run_forever()
        finally:
            loop.run_until_complete(loop.shutdown_asyncgens())
            loop.close()

    async def _open(self) -> int:
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(self._accept, self.listen_host, 0)
        return int(self._server.sockets[0].getsockname()[1])

    def _accept(self) -> asyncio.BaseProtocol:
        loop = asyncio.get_running_loop()
        self._counts["connections"] += 1
        up = Stream(loop, self._up, lambda n: self._add("bytes_up", n))
        down = Stream(loop, self._down, lambda n: self._add("bytes_down", n))
        pipe = Pipe(loop, up, down, on_end=self._pipe_ended)
        self._pipes.add(pipe)
        pipe.connect_upstream(*self.upstream)
        return pipe.client

    def _pipe_ended(self, pipe: Pipe) -> None:
        *counts, header = pipe.upstream.segments()
        for i, n in enumerate(counts):
            self._ended_headers[i] += n * header
        self._pipes.discard(pipe)

    def _add(self, key: str, n: int) -> None:
        self._counts[key] += n

    async def _shutdown(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
        for pipe in list(self._pipes):
            pipe.abort()
        # Let transports run connection_lost and close their sockets before the loop stops.
        for _ in range(100):
            if not self._pipes:
                break
            await asyncio.sleep(0.001)
        tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
