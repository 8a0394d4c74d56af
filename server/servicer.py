"""PolicyServicer: a thin grpc.aio translator over sessions, validation, the batchers and the models.

The plain functions `hello`, `prepare` and `answer` do the work; `decide` chains them for
blocking callers, and the async RPC methods await the batcher's future on the event loop,
so an open ActStream costs no thread and thousands of devices can hold one.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import threading
import time
from collections import Counter
from collections.abc import AsyncIterator
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, NoReturn

import grpc
import numpy as np

from protos import policy_pb2 as pb
from protos import policy_pb2_grpc as pb_grpc
from server.batcher import DynamicBatcher, Result
from server.config import ServerConfig
from server.errors import DRAINING, Kind, RequestError, echo
from server.logs import events
from server.loop_bridge import BatcherClosed, LoopBridge
from server.metrics import Metrics
from server.models import PolicyModels, Spec
from server.realtime_io import history_sample, split_chunk
from server.reaper import Reaper
from server.sessions import Sessions, bundle_key
from server.status import code_for
from server.stream_history import StreamHistory, stream_history
from server.validation import (
    DTYPE_NAMES,
    PROTO_DTYPES,
    features_sample,
    observation_sample,
    scale_matches,
)

log = logging.getLogger(__name__)
UINT32_MAX = 2**32 - 1
LOUD_CODES = ("UNAUTHENTICATED", "RESOURCE_EXHAUSTED", "INTERNAL")  # logged as warnings


def tensor_spec(spec: Spec) -> pb.TensorSpec:
    """A Spec as the wire's TensorSpec."""
    return pb.TensorSpec(
        shape=list(spec.shape),
        dtype=PROTO_DTYPES[spec.dtype],
        scale=spec.scale,
        zero_point=spec.zero_point,
    )


def _short(digest: str) -> str:
    return f"{echo(digest[:12])}…" if len(digest) > 12 else (echo(digest) or "(none)")


def check_split_hello(request: pb.HelloRequest, models: PolicyModels) -> None:
    """Refuse a split-mode Hello whose encoder digest or feature spec (shape, dtype and, for
    uint8, scale/zero_point) differs from the bundle's."""
    client_bundle = (
        f"bundle {echo(request.bundle_name or '?')} {echo(request.bundle_version or '?')}"
    )
    server_bundle = f"bundle {models.name} {models.version}"
    if request.encoder_digest != models.digest:
        raise RequestError(
            Kind.PRECONDITION,
            f"encoder digest mismatch: client {_short(request.encoder_digest)} "
            f"({client_bundle}) vs server {_short(models.digest)} ({server_bundle})",
        )
    fs, want = request.feature_spec, models.features
    client = Spec(
        tuple(fs.shape),
        DTYPE_NAMES.get(fs.dtype, "unspecified" if not fs.dtype else f"dtype{fs.dtype}"),
        fs.scale,
        fs.zero_point,
    )
    # the dtype is the bundle's: a uint8 encoder next to a float32 head (or the reverse) is
    # another export of the model; only quantised features carry a scale that must agree
    same = (
        client.shape == want.shape
        and client.dtype == want.dtype
        and (
            not want.quantised
            or (scale_matches(client.scale, want.scale) and client.zero_point == want.zero_point)
        )
    )
    if not same:
        raise RequestError(
            Kind.PRECONDITION,
            f"feature spec mismatch: client {client.describe()} ({client_bundle}) "
            f"vs server {want.describe()} ({server_bundle})",
        )


def action_tensor(row: np.ndarray) -> pb.Tensor:
    """One action row as a little-endian Tensor; a discrete action is shape [1] INT64."""
    a = np.atleast_1d(np.asarray(row))
    a = a.astype("<i8") if a.dtype.kind in "iu" else a.astype("<f4")
    return pb.Tensor(shape=list(a.shape), dtype=PROTO_DTYPES[a.dtype.name], data=a.tobytes())


def _wait_limit(time_remaining: float | None) -> float | None:
    # gRPC reports "no deadline" as None or as a huge number that overflows a lock timeout
    return time_remaining if time_remaining is not None and time_remaining < 86_400 else None


def _micros(seconds: float) -> int:
    return min(UINT32_MAX, max(0, round(seconds * 1e6)))


class PolicyServicer(pb_grpc.PolicyServicer):
    """splitedge.v1.Policy for one bundle: Hello opens a session, Act/ActStream answer with actions."""

    def __init__(self, models: PolicyModels, cfg: ServerConfig):
        self.models, self.cfg = models, cfg
        self.sessions = Sessions(
            bundle_key(models.name, models.version, models.digest), cfg.max_sessions
        )
        self.metrics = Metrics()
        self.metrics.describe_bundle(models.name, models.version, models.digest)
        self.metrics.count_sessions_with(self.sessions.active)
        delay = cfg.max_delay_ms / 1e3
        # one batcher per model: a batch must be all features or all frames
        self.head = DynamicBatcher(
            models.head, cfg.max_batch, delay, "batcher-head", self.metrics.batch_observer("head")
        )
        self.full = DynamicBatcher(
            models.full, cfg.max_batch, delay, "batcher-full", self.metrics.batch_observer("full")
        )
        self._queue_seconds = {
            id(b): self.metrics.queue_seconds.labels(name)
            for b, name in ((self.head, "head"), (self.full, "full"))
        }
        self.bridge = LoopBridge()
        self._decoders: ThreadPoolExecutor | None = None  # PNG/JPEG decoding off the event loop
        self._lock = threading.Lock()
        self._decisions = 0
        self._errors: Counter[str] = Counter()
        self._started, self._cpu0 = time.monotonic(), time.process_time()
        self._draining = False
        self._idle_streams: set[asyncio.Task[Any]] = set()  # streams waiting for a request
        # ends streams idle past cfg.stream_idle_s and unary calls past cfg.unary_deadline_s
        self.reaper = Reaper(min(cfg.stream_idle_s, cfg.unary_deadline_s) / 4)

    @classmethod
    def from_config(cls, cfg: ServerConfig) -> PolicyServicer:
        """Load cfg.bundle and build a servicer for it (SplitedgeError if the bundle is unusable)."""
        return cls(PolicyModels.load(cfg.bundle, cfg.ort_threads), cfg)

    # -- plain functions the RPCs translate ---------------------------------------------------
    def hello(self, request: pb.HelloRequest) -> pb.HelloReply:
        """Open a session after checking the client's encoder against the bundle (split mode)."""
        if self._draining:  # a new session belongs on a replica that will keep serving it
            raise RequestError(Kind.UNAVAILABLE, DRAINING)
        if request.mode not in (pb.MODE_SPLIT, pb.MODE_RAW):
            raise RequestError(
                Kind.INVALID, f"unknown mode {echo(request.mode)}; use MODE_SPLIT or MODE_RAW"
            )
        if request.mode == pb.MODE_SPLIT:
            check_split_hello(request, self.models)
        session = self.sessions.open(raw=request.mode == pb.MODE_RAW, client_id=request.client_id)
        m = self.models
        return pb.HelloReply(
            session_id=session.id,
            bundle_name=m.name,
            bundle_version=m.version,
            encoder_digest=m.digest,
            feature_spec=tensor_spec(m.features),
            observation_spec=tensor_spec(m.observation),
            action_spec=tensor_spec(m.action),
        )

    def validate(
        self, request: pb.ActRequest, record: StreamHistory | None = None
    ) -> tuple[DynamicBatcher, Any, float]:
        """Check a request against its session: (batcher, model sample, decode seconds).
        `record`: the stream's own answers, for a bundle whose server keeps the history."""
        session = self.sessions.get(request.session_id)
        if not request.HasField("input"):
            raise RequestError(Kind.INVALID, "request has no input tensor")
        t0 = time.perf_counter()
        if session.raw:
            sample, batcher = observation_sample(request.input, self.models.observation), self.full
        else:
            sample, batcher = features_sample(request.input, self.models.features), self.head
        history = history_sample(request, self.models, record)  # a delay-aware head's 2nd input
        model_input: Any = sample if history is None else (sample, history)
        return batcher, model_input, time.perf_counter() - t0  # decoding counts as compute

    def submit(self, batcher: DynamicBatcher, sample: Any) -> Future[Result]:
        """Queue one sample on its batcher (UNAVAILABLE once the server is closing)."""
        try:
            return batcher.submit(sample)
        except RuntimeError as e:
            raise RequestError(Kind.UNAVAILABLE, DRAINING) from e

    def answer(
        self, request: pb.ActRequest, batcher: DynamicBatcher, result: Result, decode_s: float,
        record: StreamHistory | None = None,
    ) -> pb.ActReply:  # fmt: skip
        """The reply for a request whose batch came back (kept in the stream's `record`)."""
        row, queue_s, compute_s = result
        self._queue_seconds[id(batcher)].observe(queue_s)
        with self._lock:
            self._decisions += 1
        action, chunk = split_chunk(row, self.models)  # a chunking head answers H actions
        if record is not None and request.tick >= 1:
            record.answered(request.episode, request.tick, action)
        return pb.ActReply(
            step=request.step,
            action=action_tensor(action),
            queue_us=_micros(queue_s),
            compute_us=_micros(compute_s + decode_s),
            chunk=chunk,
        )

    def decide(self, request: pb.ActRequest, time_remaining: float | None = None) -> pb.ActReply:
        """Validate one request, run it through its batcher and build the reply (blocking)."""
        batcher, sample, decode_s = self.validate(request)
        future = self.submit(batcher, sample)
        try:
            result = future.result(timeout=_wait_limit(time_remaining))
        except concurrent.futures.TimeoutError:
            future.cancel()
            raise RequestError(
                Kind.DEADLINE, "deadline passed while waiting for the model"
            ) from None
        except Exception as e:
            log.exception("model call failed")
            raise RequestError(Kind.INTERNAL, f"model failed on this input: {e}") from e
        return self.answer(request, batcher, result, decode_s)

    async def decide_async(
        self, request: pb.ActRequest, record: StreamHistory | None = None
    ) -> pb.ActReply:
        """decide() for the event loop: frames decode on a worker thread, the model is awaited.

        A passed deadline cancels the calling task; the bridge then cancels the batcher's
        future, so the batch skips it.
        """
        if request.input.codec == pb.CODEC_NONE:
            batcher, sample, decode_s = self.validate(request, record)
        else:
            loop = asyncio.get_running_loop()
            batcher, sample, decode_s = await loop.run_in_executor(
                self._decoder_pool(), self.validate, request, record
            )
        try:
            result = await self.bridge.run(batcher, sample)
        except BatcherClosed:
            raise RequestError(Kind.UNAVAILABLE, DRAINING) from None
        except Exception as e:
            log.exception("model call failed")
            raise RequestError(Kind.INTERNAL, f"model failed on this input: {e}") from e
        return self.answer(request, batcher, result, decode_s, record)

    def _decoder_pool(self) -> ThreadPoolExecutor:
        if self._decoders is None:
            self._decoders = ThreadPoolExecutor(self.cfg.workers, thread_name_prefix="decode")
        return self._decoders

    # -- gRPC methods (grpc.aio) --------------------------------------------------------------
    async def Hello(
        self, request: pb.HelloRequest, context: grpc.aio.ServicerContext
    ) -> pb.HelloReply:  # noqa: N802
        try:
            reply = self.hello(request)
        except Exception as e:
            await self._refuse(context, e, "Hello")
        self.metrics.answered("Hello")
        events.event(
            "hello",
            logging.INFO,
            "session opened",
            mode="raw" if request.mode == pb.MODE_RAW else "split",
            client_id=echo(request.client_id) or "-",
            peer=context.peer(),
        )
        return reply

    async def Act(self, request: pb.ActRequest, context: grpc.aio.ServicerContext) -> pb.ActReply:  # noqa: N802
        try:
            reply = await self.decide_async(request)
        except Exception as e:
            await self._refuse(context, e, "Act")
        self.metrics.answered("Act")
        return reply

    async def ActStream(  # noqa: N802
        self, request_iterator: AsyncIterator[pb.ActRequest], context: grpc.aio.ServicerContext
    ) -> None:
        # One request at a time; a bad message ends this stream with its status, other
        # streams never notice. A stream idle for cfg.stream_idle_s is closed (the reaper
        # cancels its read). While draining, a stream ends (UNAVAILABLE) as soon as it has
        # no request in flight, so shutdown need not wait out the grace period on idle streams.
        task = asyncio.current_task()
        assert task is not None
        record = stream_history(self.models)  # this stream's answers (server-history bundles)
        self.metrics.open_streams.inc()
        try:
            while not self._draining:
                self._idle_streams.add(task)
                self.reaper.arm(task, self.cfg.stream_idle_s)
                try:
                    request = await context.read()
                except asyncio.CancelledError:
                    if self.reaper.reaped(task):
                        idle = RequestError(
                            Kind.IDLE,
                            f"no request for {self.cfg.stream_idle_s:g} s; "
                            "open a new stream when needed",
                        )
                        await self._refuse(context, idle, "ActStream")
                    if not self._draining:
                        raise  # the client went away or its deadline passed
                    break
                except RequestError as e:  # not a valid ActRequest (server/guard.py)
                    await self._refuse(context, e, "ActStream")
                finally:
                    self._idle_streams.discard(task)
                    self.reaper.disarm(task)
                if request is grpc.aio.EOF:
                    return
                try:
                    reply = await self.decide_async(request, record)
                except Exception as e:
                    await self._refuse(context, e, "ActStream")
                self.metrics.answered("ActStream")
                await context.write(reply)
            await self._refuse(context, RequestError(Kind.UNAVAILABLE, DRAINING), "ActStream")
        finally:
            self.metrics.open_streams.dec()

    async def _refuse(
        self, context: grpc.aio.ServicerContext, error: Exception, method: str
    ) -> NoReturn:
        if not isinstance(error, RequestError):  # a bug of ours: say so, keep serving
            log.error("request failed", exc_info=error)
            error = RequestError(
                Kind.INTERNAL, f"internal error ({type(error).__name__}); see the server log"
            )
        self.refused(method, error)
        await context.abort(code_for(error.kind), error.message)
        raise AssertionError("context.abort returned")  # it raises; this keeps the types honest

    def refused(self, method: str, error: RequestError) -> None:
        """Count one refused call (stats, metrics) and log it (rate-limited per code)."""
        code = code_for(error.kind).name
        with self._lock:
            self._errors[code] += 1
        self.metrics.answered(method, code)
        level = logging.WARNING if code in LOUD_CODES else logging.INFO
        events.event(
            f"refused.{code}", level, "call refused", method=method, code=code, why=error.message
        )

    # -- lifecycle and counters -------------------------------------------------------------
    def mark_draining(self) -> None:
        """Say the drain has begun (/ready 503, splitedge_serving 0, no new sessions): safe
        from any thread, so a caller of PolicyServer.stop() sees it as soon as stop() returns."""
        self._draining = True
        self.metrics.serving.set(0)

    def begin_drain(self) -> None:
        """Stop keeping streams open: idle ones end now, busy ones after their current reply.

        Call it on the event loop thread (it cancels the idle streams' reads)."""
        self.mark_draining()
        for task in list(self._idle_streams):
            task.cancel()

    @property
    def draining(self) -> bool:
        return self._draining

    def stats(self) -> dict[str, Any]:
        """Decisions, refusals by status code, and this process's CPU seconds since start.

        cpu_s is time.process_time(): every thread of the server process (gRPC, batchers,
        onnxruntime), so cpu_s / decisions is the server's CPU cost per decision.
        Requests gRPC refuses before our code runs (over max_message_bytes) are not counted.
        """
        with self._lock:
            decisions, errors = self._decisions, dict(self._errors)
        cpu = time.process_time() - self._cpu0
        return {
            "bundle": f"{self.models.name} {self.models.version}",
            "decisions": decisions,
            "errors": errors,
            "cpu_s": cpu,
            "cpu_s_per_decision": cpu / decisions if decisions else None,
            "uptime_s": time.monotonic() - self._started,
            "sessions": len(self.sessions),
            "sessions_adopted": self.sessions.adopted,
            "head_batches": self.head.stats(),
            "full_batches": self.full.stats(),
            "config": self.cfg.to_dict(),
        }

    def close(self) -> None:
        """Answer what is queued, then stop the batcher and decoder threads."""
        self.head.close()
        self.full.close()
        if self._decoders is not None:
            self._decoders.shutdown(wait=True)
