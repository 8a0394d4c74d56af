"""Bounded resources under abuse (issue 19): held bodies, idle connections and idle streams
all at once against a `splitedge serve` process with device tokens (and with mutual TLS +
tokens), while a well-behaved device keeps getting correct actions; a server limited to 512
open files outlives a connection flood; the request size cap comes from the bundle.

Counts are scaled to a 2-core CI machine shared with other tests: 150 held near-limit
bodies (half without a token, refused from their headers; half with one, held until the
server's unary deadline), 500 idle connections and 2,000 idle streams in the tokens case; the
TLS case does a third of the TLS handshakes. Times are checked against the configured limits:
never closed before the limit, and closed within a bound 10x past it.
"""

from __future__ import annotations

import asyncio
import json
import math
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import psutil
import pytest

from deploy.bench_server import ChildServer
from deploy.server_process import free_port, serve_argv
from protos import policy_pb2 as pb
from protos import policy_pb2_grpc as pb_grpc
from server.config import ServerConfig
from server.limits import request_limit
from server.models import PolicyModels
from splitedge.commands.certs import make_certs
from tests import h2raw
from tests.conftest import ROOT, ZOO_BUNDLE
from tests.test_server import T, action_of, reference

IDLE_S = 6.0  # --max-connection-idle-s and --stream-idle-s
DEADLINE_S = 4.0  # --unary-deadline-s
RSS_BOUND_MB = 300  # the stated bound for one replica under all of this at once
ACT = "/splitedge.v1.Policy/Act"


@dataclass
class Abuse:
    """How much of each abuse one run sends."""

    idle_connections: int
    held_bodies: int  # half without a token, half with one
    idle_streams: int


@dataclass
class Target:
    server: ChildServer
    port: int
    token: str
    tls: Any  # ssl.SSLContext for raw connections, or None
    channel_credentials: grpc.ChannelCredentials | None

    def channel(self, **options: Any) -> grpc.Channel:
        target, opts = f"127.0.0.1:{self.port}", list(options.items())
        if self.channel_credentials is None:
            return grpc.insecure_channel(target, options=opts)
        return grpc.secure_channel(target, self.channel_credentials, options=opts)

    def aio_channel(self) -> grpc.aio.Channel:
        target, opts = f"127.0.0.1:{self.port}", [("grpc.use_local_subchannel_pool", 1)]
        if self.channel_credentials is None:
            return grpc.aio.insecure_channel(target, options=opts)
        return grpc.aio.secure_channel(target, self.channel_credentials, options=opts)

    @property
    def metadata(self) -> tuple[tuple[str, str], ...]:
        return (("authorization", f"Bearer {self.token}"),)


def _serve(tmp: Path, mtls: bool) -> Iterator[Target]:
    make_certs(tmp, ["pi-01"], [])
    port, metrics_port = free_port(), free_port()
    extra = ["--metrics-port", str(metrics_port), "--tokens", str(tmp / "tokens.txt"), "--max-connection-idle-s", str(IDLE_S),
             "--stream-idle-s", str(IDLE_S), "--unary-deadline-s", str(DEADLINE_S),
             "--max-streams-per-connection", "100"]  # fmt: skip
    tls = creds = None
    if mtls:
        extra += ["--tls-cert", str(tmp / "server.pem"), "--tls-key", str(tmp / "server.key"),
                  "--client-ca", str(tmp / "ca.pem"), "--health-port", str(free_port())]  # fmt: skip
        d = tmp / "devices"
        tls = h2raw.tls_client(str(tmp / "ca.pem"), str(d / "pi-01.pem"), str(d / "pi-01.key"))
        creds = grpc.ssl_channel_credentials(
            (tmp / "ca.pem").read_bytes(),
            (d / "pi-01.key").read_bytes(),
            (d / "pi-01.pem").read_bytes(),
        )
    argv = serve_argv(ZOO_BUNDLE, port, *extra)
    health = f"127.0.0.1:{extra[extra.index('--health-port') + 1]}" if mtls else None
    server = ChildServer(argv, health or f"127.0.0.1:{port}", metrics_port)
    token = (tmp / "devices" / "pi-01.token").read_text().strip()
    try:
        yield Target(server, port, token, tls, creds)
    finally:
        server.stop()


@pytest.fixture(params=["tokens", "mtls+tokens"])
def target(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Target]:
    yield from _serve(tmp_path, request.param == "mtls+tokens")


class GoodDevice(threading.Thread):
    """Acts all along on one stream (so it is never idle) and checks every action."""

    def __init__(self, t: Target):
        super().__init__(daemon=True)
        self.t, self.ok, self.errors, self.done = t, 0, [], threading.Event()
        manifest = json.loads((ZOO_BUNDLE / "manifest.json").read_text())
        self.out, self.digest = (
            manifest["policy"]["encoder"]["output"],
            manifest["policy"]["encoder"]["digest"],
        )
        self.feats = np.random.default_rng(7).integers(0, 256, (32, 64), dtype=np.uint8)
        self.want = reference(ZOO_BUNDLE, "head.onnx", self.feats).tolist()

    def run(self) -> None:
        import queue

        out = self.out
        spec = pb.TensorSpec(
            shape=[64], dtype=pb.UINT8, scale=out["scale"], zero_point=out["zero_point"]
        )
        try:
            with self.t.channel() as ch:
                stub = pb_grpc.PolicyStub(ch)
                hello = pb.HelloRequest(
                    bundle_name="cartpole-ppo", encoder_digest=self.digest, feature_spec=spec
                )
                sid = stub.Hello(hello, timeout=T, metadata=self.t.metadata).session_id
                requests: queue.Queue[pb.ActRequest | None] = queue.Queue()
                replies = stub.ActStream(
                    iter(requests.get, None), timeout=300, metadata=self.t.metadata
                )
                step = 0
                while not self.done.is_set():
                    i = step % len(self.feats)
                    tensor = pb.Tensor(shape=[64], dtype=pb.UINT8, data=self.feats[i].tobytes(),
                                       scale=out["scale"], zero_point=out["zero_point"])  # fmt: skip
                    requests.put(pb.ActRequest(session_id=sid, step=step, input=tensor))
                    reply = next(replies)
                    if reply.step != step or action_of(reply) != self.want[i]:
                        self.errors.append(f"step {step}: {action_of(reply)} != {self.want[i]}")
                    self.ok += 1
                    step += 1
                    time.sleep(0.02)
                requests.put(None)
        except Exception as e:
            self.errors.append(repr(e))


class RssSampler(threading.Thread):
    def __init__(self, pid: int):
        super().__init__(daemon=True)
        self.proc, self.peak_mb, self.done = psutil.Process(pid), 0.0, threading.Event()

    def run(self) -> None:
        while not self.done.wait(0.1):
            self.peak_mb = max(self.peak_mb, self.proc.memory_info().rss / 2**20)


def _open_streams(
    t: Target, n: int, holding: threading.Event, per: int = 100
) -> list[tuple[str, str, float, float]]:
    """n idle ActStreams (100 per connection); each one's (code, details, opened, ended) once
    the server ends it. `holding` is set when all are open on the server."""

    async def main() -> list[tuple[str, str, float, float]]:
        channels = [t.aio_channel() for _ in range(math.ceil(n / per))]
        calls, opened = [], []
        for i in range(n):
            calls.append(pb_grpc.PolicyStub(channels[i // per]).ActStream(metadata=t.metadata))
            opened.append(time.monotonic())
            if i % per == per - 1:
                # paced: a burst of thousands of new calls is shed by gRPC core itself
                # (grpc.server.max_pending_requests) before our code sees it
                await asyncio.sleep(0.1)

        async def ended(call: Any, t0: float) -> tuple[str, str, float, float]:
            code = await call.code()
            return code.name, await call.details(), t0, time.monotonic()

        waits = [asyncio.ensure_future(ended(c, t0)) for c, t0 in zip(calls, opened, strict=True)]
        holding.set()
        out = await asyncio.gather(*waits)
        for ch in channels:
            await ch.close()
        return out

    return asyncio.run(main())


def _metric(t: Target, name: str, **labels: str) -> float:
    """The sum of a metric's samples that have these labels, scraped from the server."""
    import urllib.request

    from prometheus_client.parser import text_string_to_metric_families

    url = f"http://127.0.0.1:{t.server.metrics_port}/metrics"
    text = urllib.request.urlopen(url, timeout=T).read().decode()
    return sum(
        sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
        if sample.name == name and labels.items() <= sample.labels.items()
    )


def test_held_bodies_idle_connections_and_streams_are_bounded(target: Target) -> None:
    t = target
    mtls = t.tls is not None
    abuse = Abuse(200, 150, 2000) if mtls else Abuse(500, 150, 2000)
    cap = request_limit(ServerConfig(bundle=ZOO_BUNDLE), PolicyModels.load(ZOO_BUNDLE))
    server_proc = psutil.Process(t.server.proc.pid)
    base_mb = server_proc.memory_info().rss / 2**20
    good = GoodDevice(t)
    good.start()
    rss = RssSampler(t.server.proc.pid)
    rss.start()
    t0 = time.monotonic()

    def rss_mb() -> float:
        return float(server_proc.memory_info().rss / 2**20)

    idle = [(h2raw.connect("127.0.0.1", t.port, t.tls), time.monotonic())
            for _ in range(abuse.idle_connections)]  # fmt: skip
    # watched from now on, so each close is timed when it happens, not when the test looks
    watcher = ThreadPoolExecutor(2)
    idle_watch = watcher.submit(
        h2raw.watch_until_closed, [c for c, _ in idle], [o for _, o in idle], 10 * IDLE_S
    )
    time.sleep(0.5)
    after_connections = rss_mb()
    held: list[tuple[h2raw.Connection, bool, float]] = []
    authority = f"127.0.0.1:{t.port}"
    body = h2raw.grpc_message_prefix(cap - 1) + bytes(cap - 2)  # one byte short, held open
    for i in range(abuse.held_bodies):
        conn = h2raw.connect("127.0.0.1", t.port, t.tls)
        token = t.token if i % 2 else None
        conn.start_call(1, h2raw.grpc_headers(ACT, authority, token, tls=mtls))
        conn.send_data(1, body)
        held.append((conn, token is not None, time.monotonic()))
    for conn, with_token, _ in held:  # refused from its headers, not cut off by the deadline
        if not with_token:
            frames = conn.read_frames(T) or []
            answer = b"".join(f[3] for f in frames if f[0] == h2raw.HEADERS and f[2] == 1)
            assert b"bearer token" in answer, frames
    held_watch = watcher.submit(
        h2raw.watch_until_closed,
        [c for c, w, _ in held if w],
        [o for _, w, o in held if w],
        10 * (IDLE_S + DEADLINE_S),
    )
    after_bodies = rss_mb()

    holding = threading.Event()
    streams: list[tuple[str, str, float, float]] = []
    opener = threading.Thread(
        target=lambda: streams.extend(_open_streams(t, abuse.idle_streams, holding))
    )
    opener.start()
    assert holding.wait(60)
    # all at once: every stream open on the server while the connections and bodies are held
    at_once = 0.0
    while at_once < abuse.idle_streams and time.monotonic() - t0 < 60:
        at_once = _metric(t, "splitedge_open_streams")
        time.sleep(0.2)
    at_once_mb = rss_mb()
    opener.join(60 + 10 * IDLE_S)
    assert not opener.is_alive()

    idle_told, idle_closed = idle_watch.result()
    _, held_closed = held_watch.result()
    told = [float(t) for t in idle_told if t is not None]
    closed = [float(c) for c in idle_closed if c is not None]
    held_closed = [float(c) for c in held_closed if c is not None]
    assert len(closed) == len(idle) and len(held_closed) == len(held) // 2, "still open"
    deadline_cut = _metric(t, "splitedge_errors_total", method="Act", code="DEADLINE_EXCEEDED")
    elapsed = time.monotonic() - t0
    good.done.set()
    good.join(T)
    rss.done.set()
    rss.join()
    watcher.shutdown()
    for conn in [c for c, _ in idle] + [c for c, *_ in held]:
        conn.close()

    lives = [end - start for _, _, start, end in streams]
    codes = {(code, details.split(";")[0]) for code, details, _, _ in streams}
    print(
        f"\n{'mTLS+tokens' if mtls else 'tokens'}: RSS {base_mb:.0f} MB at start, "
        f"{at_once_mb:.0f} MB with {at_once:.0f} streams, {abuse.idle_connections} idle "
        f"connections and {abuse.held_bodies} held {cap}-byte bodies open at once, peak "
        f"{rss.peak_mb:.0f} MB (bound {RSS_BOUND_MB}); idle connections told to go "
        f"(GOAWAY) after {min(told):.1f}..{max(told):.1f} s and closed after "
        f"{min(closed):.1f}..{max(closed):.1f} s; held bodies' connections closed after "
        f"{min(held_closed):.1f}..{max(held_closed):.1f} s; streams ended after "
        f"{min(lives):.1f}..{max(lives):.1f} s (limits: {IDLE_S:g} s idle, {DEADLINE_S:g} s "
        f"unary deadline); the good device got {good.ok} correct actions in {elapsed:.0f} s"
    )
    per_connection = (after_connections - base_mb) / abuse.idle_connections * 1024
    per_body = (after_bodies - after_connections) / abuse.held_bodies * 1024
    per_stream = (at_once_mb - after_bodies) / abuse.idle_streams * 1024
    print(
        f"RSS growth: {per_connection:.0f} KB per idle connection, {per_body:.0f} KB per "
        f"held body on its own connection, {per_stream:.0f} KB per idle stream"
    )
    assert good.errors == [] and good.ok > 0
    assert at_once >= abuse.idle_streams
    assert codes == {("UNAVAILABLE", f"no request for {IDLE_S:g} s")}, codes
    assert len(streams) == abuse.idle_streams
    # not before the limit (gRPC spreads max_connection_idle by +-10% so reconnects do not align)
    assert min(lives) >= IDLE_S * 0.9 and min(told) >= IDLE_S * 0.85
    assert min(held_closed) >= DEADLINE_S * 0.9
    assert deadline_cut >= abuse.held_bodies // 2
    assert rss.peak_mb < RSS_BOUND_MB


def test_a_server_with_512_files_serves_again_once_a_flood_is_reaped() -> None:
    """`prlimit --nofile=512`: the server lowers max_connections to fit (and says so), closes
    connections past it on arrival instead of running out of descriptors, and a device that
    connects during the flood is served once the idle ones are reaped."""
    port = free_port()
    idle_s = 3.0
    argv = ["prlimit", "--nofile=512:512",
            *serve_argv(ZOO_BUNDLE, port, "--max-connection-idle-s", str(idle_s))]  # fmt: skip
    server = ChildServer(argv, f"127.0.0.1:{port}")
    flood: list[h2raw.Connection] = []
    try:
        t0 = time.monotonic()
        refused = 0
        for _ in range(600):
            try:
                flood.append(h2raw.connect("127.0.0.1", port, timeout=T))
            except (ConnectionError, OSError):
                refused += 1
        manifest = json.loads((ZOO_BUNDLE / "manifest.json").read_text())
        out = manifest["policy"]["encoder"]["output"]
        spec = pb.TensorSpec(shape=[64], dtype=pb.UINT8, scale=out["scale"],
                             zero_point=out["zero_point"])  # fmt: skip
        q = np.arange(64, dtype=np.uint8)
        want = int(reference(ZOO_BUNDLE, "head.onnx", q[None])[0])
        served_after = None
        with grpc.insecure_channel(f"127.0.0.1:{port}") as ch:
            stub = pb_grpc.PolicyStub(ch)
            while served_after is None and time.monotonic() - t0 < 20 * idle_s:
                try:
                    hello = pb.HelloRequest(bundle_name="cartpole-ppo", feature_spec=spec,
                        encoder_digest=manifest["policy"]["encoder"]["digest"])  # fmt: skip
                    sid = stub.Hello(hello, timeout=2, wait_for_ready=True).session_id
                    tensor = pb.Tensor(shape=[64], dtype=pb.UINT8, data=q.tobytes(),
                                       scale=out["scale"], zero_point=out["zero_point"])  # fmt: skip
                    reply = stub.Act(pb.ActRequest(session_id=sid, input=tensor), timeout=2)
                    assert action_of(reply) == want
                    served_after = time.monotonic() - t0
                except grpc.RpcError:
                    time.sleep(0.2)
        still_open = sum(conn.read_frames(0.001) is not None for conn in flood)
    finally:
        for conn in flood:
            conn.close()
        err = server.stop()
    print(
        f"\nnofile=512: {len(flood)} of 600 flood connections accepted, {refused} refused at "
        f"connect; a device was served {served_after or -1:.1f} s after the flood began (idle limit "
        f"{idle_s:g} s); {still_open} flood connections open then"
    )
    assert "max_connections lowered from 1000 to 320" in err
    assert "File descriptor limit" not in err and "Too many open files" not in err
    assert served_after is not None


def test_request_size_cap_comes_from_the_bundle() -> None:
    from splitedge.errors import SplitedgeError
    from tests.test_server import env_frames, frame_tensor, session, start, stop

    manifest = json.loads((ZOO_BUNDLE / "manifest.json").read_text())
    c, h, w = manifest["policy"]["observation"]["shape"]
    features = math.prod(manifest["policy"]["encoder"]["output"]["shape"])
    want = max(16 << 10, 2 * max(c * h * w, 4 * features) + 4096)  # the documented rule
    models = PolicyModels.load(ZOO_BUNDLE)
    assert request_limit(ServerConfig(bundle=ZOO_BUNDLE), models) == want
    with pytest.raises(SplitedgeError, match="below what this bundle's own requests need"):
        request_limit(ServerConfig(bundle=ZOO_BUNDLE, max_message_bytes=c * h * w), models)

    s = start(ZOO_BUNDLE)
    try:
        raw = session(s, raw=True)
        noise = np.random.default_rng(0).integers(0, 256, (c, h, w), dtype=np.uint8)
        frames = [*env_frames(2), noise]
        for frame in frames:  # every valid encoding of every frame fits, noise as JPEG too
            for codec in ("none", "png", "jpeg"):
                tensor = frame_tensor(frame, codec)
                s.stub.Act(pb.ActRequest(session_id=raw, input=tensor), timeout=T)
        for size in (want + 1, (4 << 20) - 1):  # past the cap (the old fixed cap: 4 MiB)
            big = pb.ActRequest(session_id=raw, input=pb.Tensor(data=bytes(size)))
            with pytest.raises(grpc.RpcError) as info:
                s.stub.Act(big, timeout=T)
            assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    finally:
        stop(s)


def test_serve_help_shows_every_limit() -> None:
    import dataclasses

    from splitedge.commands.serve import LIMITS

    r = subprocess.run([sys.executable, "-m", "splitedge", "serve", "--help"], cwd=ROOT,
                       capture_output=True, text=True, timeout=60)  # fmt: skip
    fields = {f.name: f.default for f in dataclasses.fields(ServerConfig)}
    for flag, _, default, _ in LIMITS:
        assert flag in r.stdout
        assert fields[flag[2:].replace("-", "_")] == default  # the CLI and the config agree
    for flag in ("--metrics-host", "--metrics-token", "--metrics-tls", "--health-port",
                 "--log-level", "--log-json", "--max-sessions", "--max-message-bytes"):  # fmt: skip
        assert flag in r.stdout
