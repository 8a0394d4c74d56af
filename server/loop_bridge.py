"""Hand event-loop requests to a DynamicBatcher in groups, and its results back in groups.

Awaiting each batcher future with asyncio.wrap_future costs two cross-thread wake-ups per
request (submit wakes the batcher thread; every result wakes the loop), and with the GIL
passed to and fro on each, batches stay near size 1 under unary load. Here the requests a
loop iteration produced go to the batcher together, and a batch's results come back with
one wake-up of the loop, so the cost per batch, not per request, is what crosses threads.
"""

from __future__ import annotations

import asyncio
import functools
import threading
from concurrent.futures import Future
from typing import Any

import numpy as np

from server.batcher import DynamicBatcher, Result


class BatcherClosed(Exception):
    """The batcher stopped taking samples: the server is shutting down."""


class LoopBridge:
    """`await bridge.run(batcher, sample)` on one event loop: the batcher's (row, queue_s, compute_s)."""

    def __init__(self) -> None:
        self._loop: asyncio.AbstractEventLoop | None = None
        self._outbox: list[tuple[DynamicBatcher, np.ndarray, asyncio.Future[Result]]] = []
        self._inbox: list[tuple[asyncio.Future[Result], Future[Result]]] = []
        self._inbox_lock = threading.Lock()

    async def run(self, batcher: DynamicBatcher, sample: np.ndarray) -> Result:
        """Queue a sample with its batcher (after this loop iteration) and await its row.

        BatcherClosed if the batcher is closed; the model's exception if it failed on this sample.
        """
        loop = self._loop = self._loop or asyncio.get_running_loop()
        waiter: asyncio.Future[Result] = loop.create_future()
        self._outbox.append((batcher, sample, waiter))
        if len(self._outbox) == 1:
            loop.call_soon(self._flush)  # after the requests already ready in this iteration
        return await waiter

    def _flush(self) -> None:
        outbox, self._outbox = self._outbox, []
        for batcher, sample, waiter in outbox:
            if waiter.cancelled():  # its caller's deadline passed meanwhile
                continue
            try:
                future = batcher.submit(sample)
            except RuntimeError:
                waiter.set_exception(BatcherClosed())
                continue
            waiter.add_done_callback(functools.partial(_cancel_if_cancelled, future))
            future.add_done_callback(functools.partial(self._returned, waiter))

    def _returned(self, waiter: asyncio.Future[Result], future: Future[Result]) -> None:
        # on the batcher thread: wake the loop once for however many results pile up meanwhile
        with self._inbox_lock:
            self._inbox.append((waiter, future))
            first = len(self._inbox) == 1
        if first and self._loop is not None and not self._loop.is_closed():
            self._loop.call_soon_threadsafe(self._deliver)

    def _deliver(self) -> None:
        with self._inbox_lock:
            inbox, self._inbox = self._inbox, []
        for waiter, future in inbox:
            if waiter.done():
                continue
            if future.cancelled():
                waiter.cancel()
                continue
            error: Any = future.exception()
            if error is not None:
                waiter.set_exception(error)
            else:
                waiter.set_result(future.result())


def _cancel_if_cancelled(future: Future[Result], waiter: asyncio.Future[Result]) -> None:
    if waiter.cancelled():
        future.cancel()
