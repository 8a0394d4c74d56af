"""The device-side policy client: encode a frame, ask the server, always return an action.

User code on a robot calls this directly::

    from edge.client import connect
    with connect("models/zoo/cartpole-ppo", "10.0.0.5:50051") as policy:
        action = policy.act(frame)          # uint8 (C, H, W) -> action
        print(policy.last.total_ms)         # this decision's timings

Every call has a deadline. On a timeout or a dropped connection the client
returns the fallback action (the last action by default), counts it, and
reconnects with exponential backoff without ever blocking past the deadline.
"""

from __future__ import annotations

import queue
import random
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import numpy as np

from edge.channel import ChannelSecurity, make_channel
from edge.encoder import Encoder, make_encoder
from edge.tls_check import diagnose
from edge.wire import DTYPES, encode_frame, features_tensor, from_tensor
from protos import policy_pb2 as pb
from protos import policy_pb2_grpc as pb_grpc
from splitedge.bundle import Bundle, load_bundle
from splitedge.errors import SplitedgeError

MODES = ("split", "raw", "raw-png", "raw-jpeg")


class Unauthenticated(ConnectionError):
    """The server refused this device's credentials; retrying will not help."""

    code = grpc.StatusCode.UNAUTHENTICATED


GRPC_PREFIX = 5  # gRPC length-prefixed message header


@dataclass
class ClientConfig:
    """How the device talks to the policy server."""

    server: str
    mode: str = "split"
    backend: str = "auto"
    deadline_s: float = 2.0
    rpc: str = "stream"  # stream: one ActStream for the session; unary: one Act per step
    fallback: str = "last"  # "last" or an integer action
    backoff_s: tuple[float, float] = (0.05, 2.0)
    client_id: str = ""
    # TLS / mutual TLS / bearer token; None reads SPLITEDGE_CA, _CERT, _KEY, _TOKEN_FILE
    security: ChannelSecurity | None = None

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise SplitedgeError(f"mode {self.mode!r} is not one of {', '.join(MODES)}")
        if self.rpc not in ("stream", "unary"):
            raise SplitedgeError(f"rpc {self.rpc!r} must be stream or unary")
        if self.deadline_s <= 0:
            raise SplitedgeError(f"deadline must be > 0 s, got {self.deadline_s}")
        if self.fallback != "last":
            try:
                int(self.fallback)
            except ValueError as e:
                raise SplitedgeError(
                    f"fallback must be 'last' or an integer action, got {self.fallback!r}"
                ) from e


@dataclass
class Decision:
    """One decision's action and timings (milliseconds) and bytes (gRPC messages)."""

    action: Any
    fallback: bool = False
    encode_ms: float = 0.0
    rtt_ms: float = 0.0
    server_queue_ms: float = 0.0
    server_compute_ms: float = 0.0
    total_ms: float = 0.0
    bytes_up: int = 0
    bytes_down: int = 0
    error: str = ""


class _Stream:
    """One ActStream call with a reader thread, so each step can wait with a deadline."""

    def __init__(self, stub: pb_grpc.PolicyStub):
        self._requests: queue.Queue[pb.ActRequest | None] = queue.Queue()
        self.replies: queue.Queue[pb.ActReply | Exception] = queue.Queue()
        self._call = stub.ActStream(iter(self._requests.get, None))
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        try:
            for reply in self._call:
                self.replies.put(reply)
            self.replies.put(ConnectionError("stream closed by server"))
        except grpc.RpcError as e:
            self.replies.put(e)

    def send(self, request: pb.ActRequest) -> None:
        self._requests.put(request)

    def close(self) -> None:
        self._requests.put(None)
        self._call.cancel()


@dataclass
class PolicyClient:
    """A session with a policy server for one bundle; `act(frame)` always returns an action."""

    bundle: Bundle
    config: ClientConfig
    encoder: Encoder | None = None
    encoder_reason: str = ""
    fallbacks: int = 0
    reconnects: int = 0
    last: Decision | None = None
    _channel: Any = None
    _stub: Any = None
    _stream: _Stream | None = None
    _session: int = 0
    _step: int = 0
    _last_action: Any = None
    _retry_at: float = 0.0
    _backoff: float = 0.0
    _specs: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        policy = self.bundle.policy
        self._out = policy["encoder"]["output"]
        self._action = policy["action"]
        if self.config.mode == "split" and self.encoder is None:
            self.encoder, self.encoder_reason = make_encoder(self.bundle, self.config.backend)
        self._last_action = self._initial_action()

    def _initial_action(self) -> Any:
        value = 0 if self.config.fallback == "last" else int(self.config.fallback)
        if self._action["type"] == "discrete":
            return value
        # continuous: the value in every component, kept inside the action space's bounds
        a = np.full(self._action.get("shape", [1]), value, np.float32)
        if "low" in self._action and "high" in self._action:
            low = np.asarray(self._action["low"], np.float32).reshape(a.shape)
            high = np.asarray(self._action["high"], np.float32).reshape(a.shape)
            a = np.clip(a, low, high)
        return a

    # -- connection -------------------------------------------------------------------------
    def connect(self) -> PolicyClient:
        """Open the channel and say Hello; raises SplitedgeError if the server refuses the bundle."""
        self._open(explain=True)
        return self

    def _open(self, timeout: float | None = None, explain: bool = False) -> None:
        """Channel + Hello. explain: on a failed connection, find out whether the server
        refused our TLS credentials (a few seconds; never inside act's deadline)."""
        self._close_channel()
        self._channel = make_channel(
            self.config.server,
            options=[
                ("grpc.max_receive_message_length", 8 << 20),
                # Bandwidth-delay probing sends a 17-byte PING (and gets one back) after most
                # replies on slow links: a fifth of a decision's bytes, for a window we never fill.
                ("grpc.http2.bdp_probe", 0),
                ("grpc.keepalive_time_ms", 30_000),
            ],
            security=self.config.security,
        )
        self._stub = pb_grpc.PolicyStub(self._channel)
        mode = pb.MODE_SPLIT if self.config.mode == "split" else pb.MODE_RAW
        hello = pb.HelloRequest(
            bundle_name=self.bundle.name,
            bundle_version=self.bundle.version,
            encoder_digest=self.bundle.policy["encoder"]["digest"],
            mode=mode,
            feature_spec=pb.TensorSpec(
                shape=self._out["shape"],
                dtype=DTYPES[self._out["dtype"]],
                scale=self._out["scale"],
                zero_point=self._out["zero_point"],
            ),
            client_id=self.config.client_id,
        )
        try:
            reply = self._stub.Hello(
                hello, timeout=timeout or max(self.config.deadline_s, 5.0), wait_for_ready=True
            )
        except grpc.RpcError as e:
            self._close_channel()
            if e.code() == grpc.StatusCode.FAILED_PRECONDITION:
                raise SplitedgeError(f"server refused the bundle: {e.details()}") from e
            if explain and e.code() in (
                grpc.StatusCode.UNAVAILABLE,
                grpc.StatusCode.DEADLINE_EXCEEDED,
            ):
                # a refused TLS credential looks like a dead server to gRPC: ask TLS itself
                security = self.config.security or ChannelSecurity.from_env()
                reason = diagnose(self.config.server, security)
                if reason is not None:
                    raise Unauthenticated(f"{self.config.server}: UNAUTHENTICATED {reason}") from e
            failure = (
                Unauthenticated if e.code() == grpc.StatusCode.UNAUTHENTICATED else ConnectionError
            )
            raise failure(f"{self.config.server}: {e.code().name} {e.details()}") from e
        self._session = reply.session_id
        if self.config.rpc == "stream":
            self._stream = _Stream(self._stub)

    def _close_channel(self) -> None:
        if self._stream is not None:
            self._stream.close()
            self._stream = None
        if self._channel is not None:
            self._channel.close()
            self._channel = None

    def close(self) -> None:
        """Close the session and the encoder."""
        self._close_channel()
        if self.encoder is not None:
            self.encoder.close()

    def __enter__(self) -> PolicyClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- acting -----------------------------------------------------------------------------
    def act(self, frame: np.ndarray) -> Any:
        """Decide on one uint8 (C, H, W) frame; returns the action (fallback on failure)."""
        t0 = time.perf_counter()
        tensor = self._encode(frame)
        t1 = time.perf_counter()
        self._step += 1
        request = pb.ActRequest(step=self._step, input=tensor)  # session set once connected
        d = Decision(action=None, encode_ms=(t1 - t0) * 1e3)
        try:
            reply = self._exchange(request, t0 + self.config.deadline_s)
        except (grpc.RpcError, ConnectionError, TimeoutError, queue.Empty) as e:
            d.fallback, d.error = True, _describe(e)
            d.action = self._last_action
            self.fallbacks += 1
            if not isinstance(e, _Waiting):  # waiting out a backoff must not re-arm it
                self._schedule_reconnect()
        else:
            t2 = time.perf_counter()
            d.action = self._decode_action(reply.action)
            d.rtt_ms = (t2 - t1) * 1e3
            d.server_queue_ms, d.server_compute_ms = reply.queue_us / 1e3, reply.compute_us / 1e3
            d.bytes_down = reply.ByteSize() + GRPC_PREFIX
            self._last_action = d.action if self.config.fallback == "last" else self._last_action
            self._backoff = 0.0
        d.total_ms = (time.perf_counter() - t0) * 1e3
        d.bytes_up = request.ByteSize() + GRPC_PREFIX
        self.last = d
        return d.action

    def _encode(self, frame: np.ndarray) -> pb.Tensor:
        if self.config.mode == "split":
            assert self.encoder is not None
            features = self.encoder.encode(frame[None])[0]  # (F,) in the bundle's dtype
            return features_tensor(features, self._out)
        return encode_frame(
            frame, {"raw": "none", "raw-png": "png", "raw-jpeg": "jpeg"}[self.config.mode]
        )

    def _exchange(self, request: pb.ActRequest, deadline: float) -> pb.ActReply:
        if self._stub is None:
            if time.perf_counter() < self._retry_at:
                raise _Waiting("not connected (waiting to reconnect)")
            self.reconnects += 1
            try:
                self._open(timeout=max(deadline - time.perf_counter(), 1e-3))
            except ConnectionError:
                self._stub = None
                raise
        request.session_id = self._session  # after any reconnect: a new Hello, a new session
        timeout = max(deadline - time.perf_counter(), 1e-3)
        if self._stream is None:
            return self._stub.Act(request, timeout=timeout)
        self._stream.send(request)
        while True:
            reply = self._stream.replies.get(timeout=timeout)
            if isinstance(reply, Exception):
                raise reply
            if reply.step == request.step:  # drop late replies to steps that already fell back
                return reply
            timeout = max(deadline - time.perf_counter(), 1e-3)

    def _decode_action(self, t: pb.Tensor) -> Any:
        a = from_tensor(t)
        return int(a.reshape(-1)[0]) if self._action["type"] == "discrete" else a.astype(np.float32)

    def _schedule_reconnect(self) -> None:
        lo, hi = self.config.backoff_s
        self._backoff = min(hi, max(lo, self._backoff * 2))
        self._retry_at = time.perf_counter() + self._backoff * random.uniform(0.8, 1.2)
        self._close_channel()
        self._stub = None


class _Waiting(ConnectionError):
    """No connection, and the reconnect backoff has not passed yet."""


def _describe(e: BaseException) -> str:
    if isinstance(e, grpc.RpcError):
        return f"{e.code().name}: {e.details()}"  # type: ignore[attr-defined]
    if isinstance(e, queue.Empty):
        return "DEADLINE_EXCEEDED: no reply before the deadline"
    return f"{type(e).__name__}: {e}"


def connect(bundle: str | Path | Bundle, server: str, **config: Any) -> PolicyClient:
    """Load a bundle, open a session with the server and return a ready client."""
    b = bundle if isinstance(bundle, Bundle) else load_bundle(bundle)
    return PolicyClient(b, ClientConfig(server=server, **config)).connect()
