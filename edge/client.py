"""The device-side policy client: encode a frame, ask the server, always return an action.

User code on a robot calls this directly::

    from edge.client import connect
    with connect("models/zoo/cartpole-ppo", "10.0.0.5:50051", deadline_s=0.1) as policy:
        action = policy.act(frame)          # uint8 (C, H, W) -> action
        print(policy.last.total_ms)         # this decision's timings

Every decision has a deadline. A reply that misses it is a fallback action (the last action
by default) for that decision only: replies carry their request's step, so the late one is
dropped when it comes and the stream stays up. Only a broken stream or link (the server
went away, restarted, drained) makes the client reconnect, in a background thread with
exponential backoff, never inside a decision's deadline; decisions meanwhile wait at most
their deadline for it. `python -m edge.client_docs > docs/client.md` writes the options reference.
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

from edge.act_stream import ActStreamCall, Down, describe
from edge.channel import ChannelSecurity, make_channel
from edge.encoder import Encoder, make_encoder
from edge.history import chunk_actions, request_history
from edge.realtime import Reply, Sent
from edge.tls_check import diagnose
from edge.wire import DTYPES, encode_frame, features_tensor, from_tensor
from protos import policy_pb2 as pb
from protos import policy_pb2_grpc as pb_grpc
from splitedge.bundle import Bundle, load_bundle
from splitedge.errors import SplitedgeError
from splitedge.realtime_spec import realtime_spec

MODES = ("split", "raw", "raw-png", "raw-jpeg")
GRPC_PREFIX = 5  # gRPC length-prefixed message header
DIAGNOSE_SHARE = 0.2  # of connect()'s wait_s, kept for asking TLS why a connection failed
# a unary call failing with these means the session must be opened again (a new Hello)
REHELLO = (grpc.StatusCode.FAILED_PRECONDITION,)


class Unauthenticated(ConnectionError):
    """The server refused this device's credentials; retrying will not help."""

    code = grpc.StatusCode.UNAUTHENTICATED


@dataclass
class ClientConfig:
    """How the device talks to the policy server.

    server: 'host:port', a gRPC target (dns:///name:port) or 'ip:port,ip:port' replicas
        (round-robin over all of them).
    mode: 'split' sends the encoder's features; 'raw', 'raw-png', 'raw-jpeg' send the frame.
    backend: encoder backend for split mode ('auto' picks the best that works here).
    deadline_s: time one decision may take, encoding included; past it act() returns the
        fallback action. A late reply is dropped when it arrives; the stream stays up.
    rpc: 'stream' keeps one ActStream open for the session; 'unary' makes one Act per step.
    fallback: 'last' (the last action the server gave, 0 before any) or an integer action.
    backoff_s: (first, longest) wait between background reconnect attempts; doubles each
        failure, with +-20% jitter.
    wait_s: how long connect() waits for the server (connection, TLS, Hello) before it
        raises ConnectionError (or Unauthenticated, or SplitedgeError if the server refuses
        the bundle); a server that comes up within wait_s is used. Background reconnects
        give each attempt as long.
    client_id: a name the server logs with this device's session.
    security: TLS / mutual TLS / bearer token (edge.channel.ChannelSecurity); None reads
        SPLITEDGE_CA, SPLITEDGE_CERT, SPLITEDGE_KEY, SPLITEDGE_TOKEN_FILE, SPLITEDGE_TLS_NAME.
    """

    server: str
    mode: str = "split"
    backend: str = "auto"
    deadline_s: float = 2.0
    rpc: str = "stream"
    fallback: str = "last"
    backoff_s: tuple[float, float] = (0.05, 2.0)
    wait_s: float = 5.0
    client_id: str = ""
    security: ChannelSecurity | None = None

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise SplitedgeError(f"mode {self.mode!r} is not one of {', '.join(MODES)}")
        if self.rpc not in ("stream", "unary"):
            raise SplitedgeError(f"rpc {self.rpc!r} must be stream or unary")
        if self.deadline_s <= 0:
            raise SplitedgeError(f"deadline must be > 0 s, got {self.deadline_s}")
        if self.wait_s <= 0:
            raise SplitedgeError(f"wait_s must be > 0 s, got {self.wait_s}")
        lo, hi = self.backoff_s
        if not 0 < lo <= hi:
            raise SplitedgeError(
                f"backoff_s must be (first, longest) with 0 < first <= longest, got {self.backoff_s}"
            )
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


@dataclass
class PolicyClient:
    """A session with a policy server for one bundle; `act(frame)` always returns an action.

    Counters: `fallbacks` (decisions that got the fallback action), `reconnects` (background
    reconnects that succeeded), `late_replies` (replies dropped for arriving after their
    decision's deadline); `last` is the latest Decision. One thread at a time may call act().
    A real-time loop (edge/realtime.py) uses send() and poll() instead: nothing waits.
    """

    bundle: Bundle
    config: ClientConfig
    encoder: Encoder | None = None
    encoder_reason: str = ""
    fallbacks: int = 0
    reconnects: int = 0
    last: Decision | None = None
    _channel: Any = None
    _stub: Any = None
    _stream: ActStreamCall | None = None
    _session: int = 0
    _step: int = 0
    _last_action: Any = None
    _connected: bool = False
    _closed: bool = False
    _error: str = ""
    _specs: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        policy = self.bundle.policy
        self._out = policy["encoder"]["output"]
        self._action = policy["action"]
        if self.config.mode == "split" and self.encoder is None:
            self.encoder, self.encoder_reason = make_encoder(self.bundle, self.config.backend)
        self._last_action = self._initial_action()
        self.realtime = realtime_spec(policy, f"bundle {self.bundle.root}")
        self.start_episode()
        self._cond = threading.Condition()
        self._replies: queue.Queue[tuple[pb.ActReply, float]] = queue.Queue()  # for poll()
        self._reconnector: threading.Thread | None = None
        self._late_before = 0  # late replies of streams already closed

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

    def start_episode(self) -> None:
        """A new episode: act() tells a delay-aware head the default action for the ticks
        before it (edge/history.py), as training did."""
        self._recent = [self._initial_action()] * self.realtime.action_history

    @property
    def late_replies(self) -> int:
        stream = self._stream
        return self._late_before + (stream.late_replies if stream is not None else 0)

    # -- connection -------------------------------------------------------------------------
    def connect(self, wait_s: float | None = None) -> PolicyClient:
        """Connect and say Hello, waiting up to `wait_s` (default config.wait_s) for the server.

        Raises ConnectionError if it is not reachable in that time, Unauthenticated if it
        refuses this device's credentials, SplitedgeError if it refuses the bundle.
        """
        wait = self.config.wait_s if wait_s is None else wait_s
        end = time.perf_counter() + wait
        try:
            self._open(wait * (1 - DIAGNOSE_SHARE))
        except grpc.RpcError as e:
            raise self._failure(e, explain_by=end) from e
        return self

    def _ensure_channel(self) -> None:
        lo, hi = self.config.backoff_s
        if self._channel is None:
            self._channel = make_channel(
                self.config.server,
                options=[
                    ("grpc.max_receive_message_length", 8 << 20),
                    # Bandwidth-delay probing sends a 17-byte PING (and gets one back) after
                    # most replies on slow links: a fifth of a decision's bytes, for a window
                    # we never fill.
                    ("grpc.http2.bdp_probe", 0),
                    ("grpc.keepalive_time_ms", 30_000),
                    # gRPC's own reconnect backoff grows to 2 minutes; keep it to ours
                    ("grpc.initial_reconnect_backoff_ms", round(lo * 1000)),
                    ("grpc.min_reconnect_backoff_ms", round(lo * 1000)),
                    ("grpc.max_reconnect_backoff_ms", round(hi * 1000)),
                ],
                security=self.config.security,
            )
            self._stub = pb_grpc.PolicyStub(self._channel)

    def _open(self, timeout: float) -> None:
        """Hello (waiting up to `timeout` for the server), then the stream; grpc.RpcError."""
        with self._cond:
            if self._closed:
                raise ConnectionError("client closed")
            self._ensure_channel()
            stub = self._stub
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
        reply = stub.Hello(hello, timeout=max(timeout, 1e-3), wait_for_ready=True)
        stream = ActStreamCall(stub, self._stream_ended) if self.config.rpc == "stream" else None
        with self._cond:
            if self._closed:
                if stream is not None:
                    stream.close()
                raise ConnectionError("client closed")
            old, self._stream = self._stream, stream
            if old is not None:
                self._late_before += old.late_replies
            self._session, self._connected, self._error = reply.session_id, True, ""
            self._cond.notify_all()
        if old is not None:
            old.close()

    def _failure(self, e: grpc.RpcError, explain_by: float | None = None) -> Exception:
        """The exception connect() raises for a failed Hello."""
        code = e.code()  # type: ignore[attr-defined]
        if code == grpc.StatusCode.FAILED_PRECONDITION:
            return SplitedgeError(f"server refused the bundle: {e.details()}")  # type: ignore[attr-defined]
        if explain_by is not None and code in (
            grpc.StatusCode.UNAVAILABLE,
            grpc.StatusCode.DEADLINE_EXCEEDED,
        ):
            # a refused TLS credential looks like a dead server to gRPC: ask TLS itself
            security = self.config.security or ChannelSecurity.from_env()
            left = max(0.1, explain_by - time.perf_counter())
            reason = diagnose(self.config.server, security, timeout=left)
            if reason is not None:
                return Unauthenticated(f"{self.config.server}: UNAUTHENTICATED {reason}")
        failure = Unauthenticated if code == grpc.StatusCode.UNAUTHENTICATED else ConnectionError
        return failure(f"{self.config.server}: {code.name} {e.details()}")  # type: ignore[attr-defined]

    def _stream_ended(self, stream: ActStreamCall, error: BaseException) -> None:
        """The reader of `stream` saw it end: reconnect in the background (if it is current)."""
        with self._cond:
            if stream is not self._stream or self._closed:
                return
        self._schedule_reconnect(describe(error))

    def _schedule_reconnect(self, why: str = "link dropped") -> None:
        """Mark the session broken and have the background thread open a new one."""
        with self._cond:
            if self._closed:
                return
            self._connected, self._error = False, why
            if self._reconnector is None or not self._reconnector.is_alive():
                self._reconnector = threading.Thread(
                    target=self._reconnect_loop, name="policy-reconnect", daemon=True
                )
                self._reconnector.start()
            self._cond.notify_all()

    def _reconnect_loop(self) -> None:
        lo, hi = self.config.backoff_s
        backoff = lo
        while True:
            with self._cond:
                while self._connected and not self._closed:
                    self._cond.wait()
                if self._closed:
                    return
            try:
                self._open(self.config.wait_s)
            except (grpc.RpcError, SplitedgeError, ConnectionError, ValueError) as e:
                with self._cond:
                    self._error = describe(e)
                    self._cond.wait(backoff * random.uniform(0.8, 1.2))  # close() wakes it
                backoff = min(hi, backoff * 2)
            else:
                with self._cond:
                    self.reconnects += 1
                backoff = lo

    def _wait_connected(self, deadline: float) -> tuple[Any, ActStreamCall | None, int]:
        """(stub, stream, session) once connected, waiting for a reconnect until `deadline`."""
        with self._cond:
            reconnecting = self._reconnector is not None and self._reconnector.is_alive()
            if not self._connected and not reconnecting and not self._closed:
                self._schedule_reconnect(self._error or "not connected yet")  # no connect()
            while not self._connected and not self._closed:
                left = deadline - time.perf_counter()
                if left <= 0:
                    raise Down(f"not connected (reconnecting: {self._error})")
                self._cond.wait(left)
            if self._closed:
                raise Down("client closed")
            return self._stub, self._stream, self._session

    def close(self) -> None:
        """Close the session, the channel and the encoder."""
        with self._cond:
            self._closed = True
            stream, self._stream = self._stream, None
            channel, self._channel = self._channel, None
            self._cond.notify_all()
        if stream is not None:
            self._late_before += stream.late_replies
            stream.close()
        if channel is not None:
            channel.close()  # ends a background Hello still waiting for the server
        if self._reconnector is not None:
            self._reconnector.join(self.config.wait_s + 1.0)
        if self.encoder is not None:
            self.encoder.close()

    def __enter__(self) -> PolicyClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- acting -----------------------------------------------------------------------------
    def act(self, frame: np.ndarray, actions_in_flight: list[Any] | None = None) -> Any:
        """Decide on one uint8 (C, H, W) frame; returns the action (fallback on failure).
        A delay-aware bundle's head is also sent `actions_in_flight` (default: the last
        actions act() returned this episode; see start_episode)."""
        t0 = time.perf_counter()
        tensor = self._encode(frame)
        recent = self._recent if actions_in_flight is None else actions_in_flight
        history = request_history(recent, self._action, self.realtime.action_history)
        t1 = time.perf_counter()
        self._step += 1
        request = pb.ActRequest(step=self._step, input=tensor, actions_in_flight=history)
        d = Decision(action=None, encode_ms=(t1 - t0) * 1e3)
        try:
            reply = self._exchange(request, t0 + self.config.deadline_s)
        except (grpc.RpcError, ConnectionError, TimeoutError) as e:
            d.fallback, d.error = True, describe(e)
            d.action = self._last_action
            self.fallbacks += 1
            if isinstance(e, grpc.RpcError) and e.code() in REHELLO:  # type: ignore[attr-defined]
                self._schedule_reconnect(d.error)
        else:
            t2 = time.perf_counter()
            d.action = self._decode_action(reply.action)
            d.rtt_ms = (t2 - t1) * 1e3
            d.server_queue_ms, d.server_compute_ms = reply.queue_us / 1e3, reply.compute_us / 1e3
            d.bytes_down = reply.ByteSize() + GRPC_PREFIX
            self._last_action = d.action if self.config.fallback == "last" else self._last_action
        d.total_ms = (time.perf_counter() - t0) * 1e3
        d.bytes_up = request.ByteSize() + GRPC_PREFIX
        self.last = d
        if self._recent:
            self._recent = [*self._recent[1:], d.action]
        return d.action

    # -- acting without waiting (edge/realtime.py) --------------------------------------------
    @property
    def default_action(self) -> Any:
        """The action before any reply: 0 (or the integer `fallback`); for continuous actions
        that value in every component, clipped into the action space's bounds."""
        return self._initial_action()

    def send(
        self, frame: np.ndarray, actions_in_flight: list[Any] | None = None, tick: int = 0,
        episode: int = 0,
    ) -> Sent | None:  # fmt: skip
        """Encode a frame and send it on the stream without waiting (rpc='stream' only); its
        reply comes from poll(). None when not connected (nothing sent; a reconnect starts).
        A delay-aware bundle needs `actions_in_flight` (edge/history.py), or, when its server
        keeps them, the observation's `tick` in its episode (from 1) and an `episode` id
        (server/stream_history.py). Use either act() or send()/poll() on one client, not both."""
        if self.config.rpc != "stream":
            raise SplitedgeError("send() needs rpc='stream'; the real-time loop cannot use unary")
        t0 = time.perf_counter()
        tensor = self._encode(frame)
        if self.realtime.server_history and actions_in_flight is None:
            if tick < 1:
                raise SplitedgeError(
                    "this bundle's server keeps the actions in flight: send() needs the "
                    "observation's tick in its episode (from 1) and the episode's id"
                )
            history = None
        else:
            depth = self.realtime.action_history
            history = request_history(actions_in_flight, self._action, depth)
        encode_ms = (time.perf_counter() - t0) * 1e3
        try:
            _, stream, session = self._wait_connected(time.perf_counter())  # never waits
            assert stream is not None
            self._step += 1
            request = pb.ActRequest(
                step=self._step, session_id=session, input=tensor, actions_in_flight=history,
                tick=tick, episode=episode,
            )  # fmt: skip
            stream.send(request, self._replies)
        except Down:
            return None
        return Sent(request.step, encode_ms, request.ByteSize() + GRPC_PREFIX)

    def poll(self) -> list[Reply]:
        """Replies to send() that arrived since the last poll, in arrival order; never waits."""
        out: list[Reply] = []
        while True:
            try:
                reply, arrived = self._replies.get_nowait()
            except queue.Empty:
                return out
            action = self._decode_action(reply.action)
            queue_ms, compute_ms = reply.queue_us / 1e3, reply.compute_us / 1e3
            size = reply.ByteSize() + GRPC_PREFIX
            chunk = chunk_actions(reply.chunk, self._action) if reply.HasField("chunk") else None
            out.append(Reply(reply.step, action, arrived, queue_ms, compute_ms, size, chunk))

    def _encode(self, frame: np.ndarray) -> pb.Tensor:
        if self.config.mode == "split":
            assert self.encoder is not None
            features = self.encoder.encode(frame[None])[0]  # (F,) in the bundle's dtype
            return features_tensor(features, self._out)
        return encode_frame(
            frame, {"raw": "none", "raw-png": "png", "raw-jpeg": "jpeg"}[self.config.mode]
        )

    def _exchange(self, request: pb.ActRequest, deadline: float) -> pb.ActReply:
        stub, stream, session = self._wait_connected(deadline)
        request.session_id = session  # after any reconnect: a new Hello, a new session
        if stream is not None:
            return stream.exchange(request, deadline)
        return stub.Act(request, timeout=max(deadline - time.perf_counter(), 1e-3))  # type: ignore[no-any-return]

    def _decode_action(self, t: pb.Tensor) -> Any:
        a = from_tensor(t)
        return int(a.reshape(-1)[0]) if self._action["type"] == "discrete" else a.astype(np.float32)


def connect(bundle: str | Path | Bundle, server: str, **config: Any) -> PolicyClient:
    """Load a bundle, open a session with the server and return a ready client.

    `config` are ClientConfig's fields (deadline_s, rpc, fallback, wait_s, security, ...);
    it waits up to wait_s (default 5 s) for the server, then raises ConnectionError.
    """
    b = bundle if isinstance(bundle, Bundle) else load_bundle(bundle)
    return PolicyClient(b, ClientConfig(server=server, **config)).connect()
