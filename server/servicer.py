"""PolicyServicer: a thin gRPC translator over sessions, validation, the batchers and the models."""

from __future__ import annotations

import concurrent.futures
import logging
import threading
import time
from collections import Counter
from collections.abc import Iterator
from typing import Any, NoReturn

import grpc
import numpy as np

from protos import policy_pb2 as pb
from protos import policy_pb2_grpc as pb_grpc
from server.batcher import DynamicBatcher
from server.config import ServerConfig
from server.errors import Kind, RequestError
from server.models import PolicyModels, Spec
from server.sessions import Sessions
from server.status import code_for
from server.validation import (
    DTYPE_NAMES,
    PROTO_DTYPES,
    features_sample,
    observation_sample,
    scale_matches,
)

log = logging.getLogger(__name__)
UINT32_MAX = 2**32 - 1


def tensor_spec(spec: Spec) -> pb.TensorSpec:
    """A Spec as the wire's TensorSpec."""
    return pb.TensorSpec(
        shape=list(spec.shape),
        dtype=PROTO_DTYPES[spec.dtype],
        scale=spec.scale,
        zero_point=spec.zero_point,
    )


def _short(digest: str) -> str:
    return f"{digest[:12]}…" if len(digest) > 12 else (digest or "(none)")


def check_split_hello(request: pb.HelloRequest, models: PolicyModels) -> None:
    """Refuse a split-mode Hello whose encoder digest or feature spec differs from the bundle's."""
    client_bundle = f"bundle {request.bundle_name or '?'} {request.bundle_version or '?'}"
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
    same = client.shape == want.shape and (
        client.dtype == "float32"  # dequantised features: the server quantises them
        or (
            client.dtype == want.dtype
            and scale_matches(client.scale, want.scale)
            and client.zero_point == want.zero_point
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
        self.sessions = Sessions(cfg.max_sessions)
        delay = cfg.max_delay_ms / 1e3
        # one batcher per model: a batch must be all features or all frames
        self.head = DynamicBatcher(models.head, cfg.max_batch, delay, name="batcher-head")
        self.full = DynamicBatcher(models.full, cfg.max_batch, delay, name="batcher-full")
        self._lock = threading.Lock()
        self._decisions = 0
        self._errors: Counter[str] = Counter()
        self._started, self._cpu0 = time.monotonic(), time.process_time()

    @classmethod
    def from_config(cls, cfg: ServerConfig) -> PolicyServicer:
        """Load cfg.bundle and build a servicer for it (SplitedgeError if the bundle is unusable)."""
        return cls(PolicyModels.load(cfg.bundle, cfg.ort_threads), cfg)

    # -- plain functions the RPCs translate ---------------------------------------------------
    def hello(self, request: pb.HelloRequest) -> pb.HelloReply:
        """Open a session after checking the client's encoder against the bundle (split mode)."""
        if request.mode not in (pb.MODE_SPLIT, pb.MODE_RAW):
            raise RequestError(
                Kind.INVALID, f"unknown mode {request.mode}; use MODE_SPLIT or MODE_RAW"
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

    def decide(self, request: pb.ActRequest, time_remaining: float | None = None) -> pb.ActReply:
        """Validate one request, run it through its batcher and build the reply."""
        session = self.sessions.get(request.session_id)
        if not request.HasField("input"):
            raise RequestError(Kind.INVALID, "request has no input tensor")
        t0 = time.perf_counter()
        if session.raw:
            sample, batcher = observation_sample(request.input, self.models.observation), self.full
        else:
            sample, batcher = features_sample(request.input, self.models.features), self.head
        decode_s = time.perf_counter() - t0  # PNG/JPEG decoding counts as compute (see the proto)
        try:
            future = batcher.submit(sample)
        except RuntimeError as e:
            raise RequestError(Kind.UNAVAILABLE, "server is shutting down; retry elsewhere") from e
        try:
            row, queue_s, compute_s = future.result(timeout=_wait_limit(time_remaining))
        except concurrent.futures.TimeoutError:
            future.cancel()
            raise RequestError(
                Kind.DEADLINE, "deadline passed while waiting for the model"
            ) from None
        except Exception as e:
            log.exception("model call failed")
            raise RequestError(Kind.INTERNAL, f"model failed on this input: {e}") from e
        with self._lock:
            self._decisions += 1
        return pb.ActReply(
            step=request.step,
            action=action_tensor(row),
            queue_us=_micros(queue_s),
            compute_us=_micros(compute_s + decode_s),
        )

    # -- gRPC methods -----------------------------------------------------------------------
    def Hello(self, request: pb.HelloRequest, context: grpc.ServicerContext) -> pb.HelloReply:  # noqa: N802
        try:
            return self.hello(request)
        except Exception as e:
            self._refuse(context, e)

    def Act(self, request: pb.ActRequest, context: grpc.ServicerContext) -> pb.ActReply:  # noqa: N802
        try:
            return self.decide(request, context.time_remaining())
        except Exception as e:
            self._refuse(context, e)

    def ActStream(
        self,
        request_iterator: Iterator[pb.ActRequest],  # noqa: N802
        context: grpc.ServicerContext,
    ) -> Iterator[pb.ActReply]:
        # A bad message ends this stream with its status; other streams never notice.
        for request in request_iterator:
            try:
                reply = self.decide(request, context.time_remaining())
            except Exception as e:
                self._refuse(context, e)
            yield reply

    def _refuse(self, context: grpc.ServicerContext, error: Exception) -> NoReturn:
        if not isinstance(error, RequestError):  # a bug of ours: say so, keep serving
            log.error("request failed", exc_info=error)
            error = RequestError(
                Kind.INTERNAL, f"internal error ({type(error).__name__}); see the server log"
            )
        code = code_for(error.kind)
        with self._lock:
            self._errors[code.name] += 1
        context.abort(code, error.message)
        raise AssertionError("context.abort returned")  # it raises; this keeps the types honest

    # -- lifecycle and counters -------------------------------------------------------------
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
            "head_batches": self.head.stats(),
            "full_batches": self.full.stats(),
            "config": self.cfg.to_dict(),
        }

    def close(self) -> None:
        """Answer what is queued, then stop the batcher threads."""
        self.head.close()
        self.full.close()
