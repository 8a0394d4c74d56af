"""One proxied TCP connection: two sockets, and a timed stream through the link each way."""

from __future__ import annotations

import asyncio
import socket
import struct
from collections import deque
from collections.abc import Callable

from deploy.link.model import SerialLink
from deploy.link.profiles import PACKET_BYTES

_READ_MAX = 64 * 1024  # largest single read when the queue has room
_EOF = None  # in a delivery queue: the sender half-closed (or went away) here
_FRAME_HEADERS = 14 + 20 + 20  # Ethernet + IPv4 + TCP without options
_TCPI_OPT_TIMESTAMPS = 1


NO_SEGMENTS = (0, 0, 0, 0, 0)


def tcp_segments(sock: object) -> tuple[int, int, int, int, int]:
    """From Linux TCP_INFO: segments sent, received, data segments sent, received (pure
    ACKs excluded), and header bytes per segment (Ethernet + IP + TCP with options)."""
    try:
        info = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 160)  # type: ignore[attr-defined]
    except (OSError, AttributeError):
        return NO_SEGMENTS
    if len(info) < 160:  # kernels before 4.6 lack tcpi_data_segs_in/out
        return NO_SEGMENTS
    segs_out, segs_in = struct.unpack_from("II", info, 136)  # tcpi_segs_out, tcpi_segs_in
    data_in, data_out = struct.unpack_from("II", info, 152)  # tcpi_data_segs_in, _out
    timestamps = info[5] & _TCPI_OPT_TIMESTAMPS  # tcpi_options
    return segs_out, segs_in, data_out, data_in, _FRAME_HEADERS + (12 if timestamps else 0)


class Stream:
    """Bytes from one socket to the other: read, serialise on the shared link, deliver on time."""

    def __init__(
        self, loop: asyncio.AbstractEventLoop, link: SerialLink, count: Callable[[int], None]
    ):
        self.loop = loop
        self.link = link
        self.count = count
        self.src: Side | None = None
        self.dst: Side | None = None
        self.deliveries: deque[tuple[float, bytes | None]] = deque()  # (due time, bytes) in order
        self.last_due = 0.0  # TCP is ordered: nothing may be delivered before this
        self.timer: asyncio.TimerHandle | None = None
        self.resume_timer: asyncio.TimerHandle | None = None
        self.eof_queued = False
        self.done = False  # EOF delivered, or the destination is gone
        self.queue_full = False  # link queue over its limit: stop reading the source
        self.dst_full = False  # destination socket not draining: stop reading the source

    def carry(self, data: bytes) -> None:
        """Schedule data read just now, split into packets so long messages pipeline."""
        if self.done:
            return  # the receiver is gone; a real network would drop these too
        now = self.loop.time()
        self.count(len(data))
        view = memoryview(data)
        for start in range(0, len(data), PACKET_BYTES):
            piece = view[start : start + PACKET_BYTES]
            sent = self.link.serialise(now, len(piece))
            self._enqueue(self.link.arrival(sent), piece.tobytes(), sent)
        if self.link.is_full(now):
            self.queue_full = True
            self._update_reading()
            self._arm_resume()

    def finish_source(self) -> None:
        """The source sent FIN or vanished: the far side learns so after the bytes ahead of it."""
        if self.eof_queued or self.done:
            return
        self.eof_queued = True
        now = self.loop.time()
        self._enqueue(self.link.arrival(self.link.serialise(now, 0)), _EOF)

    def drop(self) -> None:
        """The destination is gone: forget undelivered bytes and stop reading for it."""
        self.done = True
        self.deliveries.clear()
        self._cancel_timers()
        # Keep reading the source and discard, so the sender is not stuck behind a dead peer.
        self.queue_full = self.dst_full = False
        self._update_reading()

    def read_budget(self) -> int:
        """Bytes the next read may take: free queue space, at least one packet, at most _READ_MAX."""
        return min(_READ_MAX, self.link.read_budget(self.loop.time()))

    def set_dst_full(self, full: bool) -> None:
        """Destination write buffer crossed its high/low water mark."""
        self.dst_full = full
        self._update_reading()

    def _enqueue(self, due: float, data: bytes | None, sent: float | None = None) -> None:
        due = max(due, self.last_due)  # in order, as TCP delivers: a packet waits for the one ahead
        self.last_due = due
        if sent is not None:
            self.link.applied_ms.append(1e3 * (due - sent))
        self.deliveries.append((due, data))
        if self.timer is None:
            self.timer = self.loop.call_at(due, self._deliver_due)

    def _deliver_due(self) -> None:
        self.timer = None
        now = self.loop.time() + 1e-6  # call_at may fire a clock tick early
        batch: list[bytes] = []
        eof = False
        while self.deliveries and self.deliveries[0][0] <= now:
            data = self.deliveries.popleft()[1]
            if data is None:  # _EOF
                eof = True
                break
            batch.append(data)
        dst = self.dst
        if dst is not None and dst.transport is not None and batch:
            dst.transport.write(b"".join(batch))
        if eof:
            self.done = True
            self.deliveries.clear()
            if dst is not None:
                dst.deliver_eof()
        elif self.deliveries:
            self.timer = self.loop.call_at(self.deliveries[0][0], self._deliver_due)

    def _arm_resume(self) -> None:
        if self.resume_timer is None:
            self.resume_timer = self.loop.call_at(self.link.reopens_at(), self._try_resume)

    def _try_resume(self) -> None:
        self.resume_timer = None
        if self.link.is_full(self.loop.time()):  # other connections filled it meanwhile
            self._arm_resume()
            return
        self.queue_full = False
        self._update_reading()

    def _update_reading(self) -> None:
        if self.src is not None:
            self.src.set_reading(not (self.queue_full or self.dst_full or self.done))

    def _cancel_timers(self) -> None:
        for timer in (self.timer, self.resume_timer):
            if timer is not None:
                timer.cancel()
        self.timer = self.resume_timer = None


class Side(asyncio.BufferedProtocol):
    """One socket of a proxied connection; reads straight into a buffer sized by the link queue."""

    def __init__(self, pipe: Pipe, outgoing: Stream, incoming: Stream):
        self.pipe = pipe
        self.outgoing = outgoing  # bytes this socket sends into the link
        self.incoming = incoming  # bytes the link delivers to this socket
        outgoing.src = self
        incoming.dst = self
        self.transport: asyncio.Transport | None = None  # set on connect
        self.closed = False
        self.final_segments = NO_SEGMENTS  # tcp_segments() just before the socket closed
        self._buffer = bytearray(_READ_MAX)
        self._reading = True

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        sock = transport.get_extra_info("socket")
        if sock is not None:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.pipe.side_made(self)

    def get_buffer(self, sizehint: int) -> memoryview:
        # Read no more than the link queue can take, so the rest waits in the kernel.
        return memoryview(self._buffer)[: self.outgoing.read_budget()]

    def buffer_updated(self, nbytes: int) -> None:
        self.outgoing.carry(bytes(memoryview(self._buffer)[:nbytes]))

    def eof_received(self) -> bool:
        self.outgoing.finish_source()
        return True  # keep the socket open for the other direction (half-close)

    def segments(self) -> tuple[int, int, int, int, int]:
        """This socket's tcp_segments(), also after it closed."""
        if self.closed or self.transport is None:
            return self.final_segments
        return tcp_segments(self.transport.get_extra_info("socket"))

    def connection_lost(self, exc: Exception | None) -> None:
        if self.transport is not None:  # asyncio closes the socket only after this returns
            self.final_segments = tcp_segments(self.transport.get_extra_info("socket"))
        self.closed = True
        self.outgoing.finish_source()
        self.incoming.drop()
        self.pipe.side_lost(self)

    def pause_writing(self) -> None:
        self.incoming.set_dst_full(True)

    def resume_writing(self) -> None:
        self.incoming.set_dst_full(False)

    def set_reading(self, on: bool) -> None:
        """Pause or resume reading this socket (backpressure towards its sender)."""
        if on == self._reading or self.transport is None or self.closed:
            return
        self._reading = on
        if on:
            self.transport.resume_reading()
        else:
            self.transport.pause_reading()

    def deliver_eof(self) -> None:
        """Pass on the other side's FIN: half-close, or close if nothing flows back any more."""
        if self.closed or self.transport is None or self.transport.is_closing():
            return
        if self.outgoing.done or self.outgoing.eof_queued or not self.transport.can_write_eof():
            self.transport.close()  # flushes pending writes first
        else:
            self.transport.write_eof()
        self.pipe.maybe_finish()

    def close(self) -> None:
        """Close this socket after flushing what was already delivered to it."""
        if self.transport is not None and not self.closed and not self.transport.is_closing():
            self.transport.close()


class Pipe:
    """A client connection and its upstream connection, joined through the up and down links."""

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        up: Stream,
        down: Stream,
        on_end: Callable[[Pipe], None],
    ):
        self.client = Side(self, outgoing=up, incoming=down)
        self.upstream = Side(self, outgoing=down, incoming=up)
        self.up, self.down = up, down
        self.loop = loop
        self._on_end = on_end
        self._connect_task: asyncio.Task[None] | None = None
        self._connecting = False
        self._ended = False

    def side_made(self, side: Side) -> None:
        """Client accepted: hold its bytes in the kernel until the upstream socket is open."""
        if side is self.client:
            side.set_reading(False)

    def connect_upstream(self, host: str, port: int) -> None:
        """Open the upstream socket; on failure close the client (as a refused connection would)."""
        self._connecting = True
        self._connect_task = self.loop.create_task(self._connect(host, port))

    async def _connect(self, host: str, port: int) -> None:
        refused = False
        try:
            await self.loop.create_connection(lambda: self.upstream, host, port)
        except OSError:
            refused = True
        finally:
            self._connecting = False  # also when cancelled by abort()
        if refused:
            self.client.close()
            self._check_end()  # in case the client had already gone
        elif self.client.closed:
            self.upstream.close()
        else:
            self.client.set_reading(True)

    def maybe_finish(self) -> None:
        """Close both sockets once each direction has delivered its EOF."""
        if self.up.done and self.down.done:
            self.client.close()
            self.upstream.close()

    def side_lost(self, side: Side) -> None:
        """A socket closed: finish the other one's business, or end if both are gone."""
        self.maybe_finish()
        self._check_end()

    def _check_end(self) -> None:
        upstream_gone = self.upstream.closed or (
            self.upstream.transport is None and not self._connecting
        )
        if self.client.closed and upstream_gone and not self._ended:
            self._ended = True
            self._on_end(self)

    def abort(self) -> None:
        """Tear everything down now (proxy shutdown)."""
        if self._connect_task is not None:
            self._connect_task.cancel()
        for stream in (self.up, self.down):
            stream.drop()
        for side in (self.client, self.upstream):
            if side.transport is not None and not side.closed:
                side.transport.abort()
