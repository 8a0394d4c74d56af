"""One ActStream call of the device's policy client, and how its failures are named.

A reader thread hands each reply to the decision that waits for it, queues replies of
requests sent without waiting (the real-time loop's send/poll), and counts the rest as
late; a broken stream tells its owner once. Kept apart from edge/client.py, which owns
connecting, reconnecting and the decisions themselves.
"""

from __future__ import annotations

import queue
import threading
import time
from typing import Any

import grpc

from protos import policy_pb2 as pb
from protos import policy_pb2_grpc as pb_grpc


class Late(TimeoutError):
    """No reply before the decision's deadline (the link itself may be fine)."""


class Down(ConnectionError):
    """Not connected: the stream or link broke and a background reconnect is under way."""


class ActStreamCall:
    """One ActStream call. A reader thread hands each reply to the step that waits for it and
    drops the rest (late replies to steps that already fell back); a broken stream tells
    `on_end` once."""

    def __init__(self, stub: pb_grpc.PolicyStub, on_end: Any):
        self._requests: queue.Queue[pb.ActRequest | None] = queue.Queue()
        self._cond = threading.Condition()
        self._awaiting: int | None = None
        self._reply: pb.ActReply | None = None
        self.ended: BaseException | None = None
        self.late_replies = 0
        self.sink: queue.Queue[tuple[pb.ActReply, float]] | None = None  # set by send()
        self._on_end = on_end
        self._call = stub.ActStream(iter(self._requests.get, None))
        threading.Thread(target=self._read, name="act-stream", daemon=True).start()

    def _read(self) -> None:
        error: BaseException
        try:
            for reply in self._call:
                with self._cond:
                    if reply.step == self._awaiting:
                        self._reply = reply
                        self._cond.notify_all()
                    elif self.sink is not None:  # send() without waiting: poll() takes it
                        self.sink.put((reply, time.perf_counter()))
                    else:
                        self.late_replies += 1
            error = ConnectionError("stream closed by server")
        except grpc.RpcError as e:
            error = e
        with self._cond:
            self.ended = error
            self._cond.notify_all()
        self._on_end(self, error)

    def exchange(self, request: pb.ActRequest, deadline: float) -> pb.ActReply:
        """Send a request and wait for its reply until `deadline` (perf_counter)."""
        with self._cond:
            if self.ended is not None:
                raise Down(describe(self.ended))
            self._awaiting, self._reply = request.step, None
        self._requests.put(request)
        with self._cond:
            while self._reply is None and self.ended is None:
                left = deadline - time.perf_counter()
                if left <= 0 or not self._cond.wait(left):
                    if self._reply is None and self.ended is None:
                        self._awaiting = None
                        raise Late("no reply before the deadline")
            reply, self._reply, self._awaiting = self._reply, None, None
            if reply is None:
                raise Down(describe(self.ended))  # type: ignore[arg-type]
            return reply

    def send(self, request: pb.ActRequest, sink: queue.Queue[tuple[pb.ActReply, float]]) -> None:
        """Send a request without waiting; its reply goes to `sink` with its arrival time."""
        with self._cond:
            if self.ended is not None:
                raise Down(describe(self.ended))
            self.sink = sink
        self._requests.put(request)

    def close(self) -> None:
        self._requests.put(None)
        self._call.cancel()


def describe(e: BaseException) -> str:
    if isinstance(e, grpc.RpcError):
        return f"{e.code().name}: {e.details()}"  # type: ignore[attr-defined]
    if isinstance(e, Late):
        return "DEADLINE_EXCEEDED: no reply before the deadline"
    if isinstance(e, Down):
        return f"UNAVAILABLE: {e}"
    return f"{type(e).__name__}: {e}"
