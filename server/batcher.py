"""A dynamic batcher: many callers' single samples become one model call. No gRPC in here.

Callers `submit(sample)` and get a Future; one worker thread takes the first queued
sample, gathers more until `max_batch` or until `max_delay_s` after that first
sample arrived (0 = only what is already queued: natural batching, so a lone
caller never waits), stacks them (each part apart when samples are tuples, for a model
with several inputs), calls `run_batch` once and hands each caller
its own row. If a batch fails, each sample is retried alone so the exception
reaches only the futures whose samples caused it.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any

import numpy as np

log = logging.getLogger(__name__)

# (output_row, queue_s, compute_s): the row for this sample, time spent waiting in the
# queue before its batch started, and the duration of the model call that produced it.
Result = tuple[np.ndarray, float, float]


@dataclass
class _Item:
    sample: Any  # an array, or a tuple of arrays (one per model input)
    future: Future[Result]
    enqueued: float = field(default_factory=time.perf_counter)


_STOP = object()


class DynamicBatcher:
    """Gathers single samples into batches for `run_batch` ((B, ...) -> (B, ...)) on one worker thread."""

    def __init__(
        self,
        run_batch: Callable[[Any], np.ndarray],
        max_batch: int = 64,
        max_delay_s: float = 0.0,
        name: str = "batcher",
        on_batch: Callable[[int, float], None] | None = None,
    ):
        if max_batch < 1:
            raise ValueError(f"max_batch must be >= 1, got {max_batch}")
        if not max_delay_s >= 0:
            raise ValueError(f"max_delay_s must be >= 0, got {max_delay_s}")
        self._run_batch = run_batch
        self._on_batch = on_batch  # (batch size, seconds) after every model call, e.g. metrics
        self.max_batch, self.max_delay_s = max_batch, max_delay_s
        self._queue: queue.SimpleQueue[_Item | object] = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._closed = False
        self.batches = 0  # model calls made (isolation retries included)
        self.samples = 0  # samples in those calls
        self.batch_sizes: dict[int, int] = {}  # batch size -> how many batches had it
        self._worker = threading.Thread(target=self._loop, name=name, daemon=True)
        self._worker.start()

    def submit(self, sample: Any) -> Future[Result]:
        """Queue one sample (no batch dim); the future resolves to (row, queue_s, compute_s)."""
        fut: Future[Result] = Future()
        with self._lock:  # so close() can never slip its stop marker in front of this item
            if self._closed:
                raise RuntimeError("batcher is closed")
            self._queue.put(_Item(sample, fut))
        return fut

    def close(self, timeout: float | None = None) -> None:
        """Stop taking samples, answer everything already queued, stop the worker."""
        with self._lock:
            if not self._closed:
                self._closed = True
                self._queue.put(_STOP)
        self._worker.join(timeout)

    @property
    def closed(self) -> bool:
        return self._closed

    def stats(self) -> dict[str, float | int]:
        """Model calls made, samples in them, and the mean and largest batch size."""
        return {
            "batches": self.batches,
            "samples": self.samples,
            "mean_batch": self.samples / self.batches if self.batches else 0.0,
            "max_batch_seen": max(self.batch_sizes, default=0),
        }

    # -- worker -------------------------------------------------------------------------------
    def _loop(self) -> None:
        stop = False
        while not stop:
            first = self._queue.get()
            if first is _STOP:
                break
            assert isinstance(first, _Item)
            batch = [first]
            # the delay counts from the first sample's arrival: one that already waited
            # while the worker was busy is not made to wait again
            deadline = first.enqueued + self.max_delay_s
            while len(batch) < self.max_batch:
                remaining = deadline - time.perf_counter()
                try:
                    item = (
                        self._queue.get(timeout=remaining)
                        if remaining > 0
                        else self._queue.get_nowait()
                    )
                except queue.Empty:
                    break
                if item is _STOP:
                    stop = True
                    break
                assert isinstance(item, _Item)
                batch.append(item)
            try:
                self._run(batch)
            except BaseException as e:  # never let the worker die with callers waiting
                log.exception("batcher worker failed")
                for it in batch:
                    if not it.future.done():
                        it.future.set_exception(e)

    def _run(self, batch: list[_Item]) -> None:
        live = [it for it in batch if it.future.set_running_or_notify_cancel()]  # drop cancelled
        if not live:
            return
        t0 = time.perf_counter()
        try:
            rows = self._call([it.sample for it in live])
        except Exception as e:
            if len(live) == 1:
                live[0].future.set_exception(e)
                return
            for it in live:  # find the culprit(s): everyone else still gets an answer
                self._run_alone(it)
            return
        compute = time.perf_counter() - t0
        for it, row in zip(live, rows, strict=True):
            it.future.set_result((row, t0 - it.enqueued, compute))

    def _run_alone(self, it: _Item) -> None:
        t0 = time.perf_counter()
        try:
            rows = self._call([it.sample])
        except Exception as e:
            it.future.set_exception(e)
        else:
            it.future.set_result((rows[0], t0 - it.enqueued, time.perf_counter() - t0))

    def _call(self, samples: list[Any]) -> np.ndarray:
        # a sample is one array, or a tuple of them for a model with several inputs
        x: Any = (
            tuple(np.stack(part) for part in zip(*samples, strict=True))
            if isinstance(samples[0], tuple)
            else np.stack(samples)
        )  # (B, ...) each
        t0 = time.perf_counter()
        try:
            out = np.asarray(self._run_batch(x))  # (B, ...)
        finally:
            self._count(len(samples), time.perf_counter() - t0)
        if out.ndim == 0 or out.shape[0] != len(samples):
            raise ValueError(f"run_batch returned shape {out.shape} for a batch of {len(samples)}")
        return out

    def _count(self, size: int, seconds: float) -> None:
        self.batches += 1
        self.samples += size
        self.batch_sizes[size] = self.batch_sizes.get(size, 0) + 1
        if self._on_batch is not None:
            try:
                self._on_batch(size, seconds)
            except Exception:  # an observer's bug must not fail the callers' requests
                log.exception("on_batch observer failed")
