"""A fleet: 3 `splitedge serve` replicas behind gRPC round-robin, 16 edge clients (PolicyClient,
half streaming, half unary); one replica is SIGKILLed mid-run and every client keeps acting."""

from __future__ import annotations

import os
import signal
import sys
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest

from deploy.bench_server import ChildServer
from deploy.server_process import free_port, serve_argv
from edge.channel import resolve_target
from edge.client import ClientConfig, PolicyClient
from splitedge.bundle import load_bundle
from splitedge.errors import SplitedgeError
from tests.conftest import ZOO_BUNDLE

CLIENTS, REPLICAS = 16, 3
STEP_S = 0.02  # a 50 Hz control loop
MAX_FALLBACKS = 5  # per client, for losing one replica: its calls in flight + one backoff
AFTER_KILL_OK = 25  # real actions each client must get from the survivors after the kill
LIMIT_S = 60.0  # how long to wait for each phase; on a quiet machine each takes ~2 s


@dataclass
class Replica:
    server: ChildServer
    port: int
    metrics_port: int

    def _metrics(self) -> list[str]:
        url = f"http://127.0.0.1:{self.metrics_port}/metrics"
        return urllib.request.urlopen(url, timeout=10).read().decode().splitlines()

    def decisions(self) -> float:
        return sum(
            float(line.rsplit(" ", 1)[1])
            for line in self._metrics()
            if line.startswith("splitedge_requests_total{")
            and 'code="OK"' in line
            and "Hello" not in line
        )

    def open_streams(self) -> int:
        return sum(
            int(float(line.rsplit(" ", 1)[1]))
            for line in self._metrics()
            if line.startswith("splitedge_open_streams ")
        )


def wait_for(condition: Callable[[], bool]) -> bool:
    """Poll condition until it holds or LIMIT_S passes; whether it held."""
    end = time.monotonic() + LIMIT_S
    while not condition():
        if time.monotonic() > end:
            return False
        time.sleep(0.05)
    return True


@pytest.fixture
def replicas() -> Iterator[list[Replica]]:
    started: list[Replica] = []
    threads = []

    def start_one() -> None:
        port, mport = free_port(), free_port()
        argv = serve_argv(ZOO_BUNDLE, port, "--metrics-port", str(mport))
        started.append(Replica(ChildServer(argv, f"127.0.0.1:{port}", mport), port, mport))

    for _ in range(REPLICAS):  # in parallel: each spends seconds importing onnxruntime
        threads.append(threading.Thread(target=start_one))
        threads[-1].start()
    for t in threads:
        t.join(120)
    try:
        assert len(started) == REPLICAS
        yield sorted(started, key=lambda r: r.port)
    finally:
        for r in started:
            r.server.stop()


@dataclass(eq=False)  # threads must stay hashable
class Device(threading.Thread):
    client: PolicyClient
    frames: np.ndarray
    stop: threading.Event
    killed_at: list[float]
    actions: int = 0
    after_kill_ok: int = 0  # real (non-fallback) actions after the kill
    crash: str = ""
    log: list[tuple[float, bool]] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        threading.Thread.__init__(self, daemon=True)

    def run(self) -> None:
        i = 0
        try:
            while not self.stop.is_set():
                action = self.client.act(self.frames[i % len(self.frames)])
                assert action in (0, 1), action
                fell_back = bool(self.client.last and self.client.last.fallback)
                now = time.monotonic()
                self.actions += 1
                if self.killed_at and now > self.killed_at[0] and not fell_back:
                    self.after_kill_ok += 1
                self.log.append((now, fell_back))
                if fell_back and self.client.last:
                    self.errors.append(self.client.last.error)
                i += 1
                time.sleep(STEP_S)
        except BaseException as e:  # a client must never raise out of act()
            self.crash = f"{type(e).__name__}: {e}"


def test_clients_keep_acting_when_a_replica_is_killed(replicas: list[Replica]) -> None:
    bundle = load_bundle(ZOO_BUNDLE)
    target = ",".join(f"127.0.0.1:{r.port}" for r in replicas)
    frames = np.random.default_rng(0).integers(0, 256, (8, 3, 48, 48), dtype=np.uint8)
    stop, killed_at = threading.Event(), []
    devices = []
    for i in range(CLIENTS):
        cfg = ClientConfig(
            server=target,
            backend="ort",
            rpc="stream" if i % 2 else "unary",
            deadline_s=2.0,
            client_id=f"dev-{i}",
        )
        devices.append(Device(PolicyClient(bundle, cfg).connect(), frames, stop, killed_at))
    for d in devices:
        d.start()
    try:
        # round-robin: every replica gets work (polled: a loaded machine gets there later)
        assert wait_for(lambda: all(r.decisions() > 0 for r in replicas))
        assert wait_for(lambda: min(d.actions for d in devices) >= 10)  # every client is acting
        before = [r.decisions() for r in replicas]
        # the replica holding the most streams (8 over 3: at least 3), so the kill is felt
        streams = [r.open_streams() for r in replicas]
        victim = replicas[streams.index(max(streams))]
        victim.server.proc.send_signal(signal.SIGKILL)
        killed_at.append(time.monotonic())
        # every client goes on getting real actions from the survivors (bug: clients stuck on
        # the dead replica). Counted, not timed: ~1 s on a quiet machine, LIMIT_S at most.
        wait_for(lambda: min(d.after_kill_ok for d in devices) >= AFTER_KILL_OK)
    finally:
        stop.set()
        for d in devices:
            d.join(10)
            d.client.close()
    assert [d.crash for d in devices] == [""] * CLIENTS
    fallbacks = [d.client.fallbacks for d in devices]
    assert max(fallbacks) <= MAX_FALLBACKS, [
        (f, sorted(set(d.errors))) for f, d in zip(fallbacks, devices, strict=True)
    ]
    # each stream on the victim broke and was reopened on a survivor, in the background (so
    # a break between two decisions costs none of them a fallback)
    assert sum(d.client.reconnects for d in devices) >= max(streams) >= 3
    assert min(d.after_kill_ok for d in devices) >= AFTER_KILL_OK, [
        d.after_kill_ok for d in devices
    ]
    alive = [i for i, r in enumerate(replicas) if r is not victim]
    after = {i: replicas[i].decisions() for i in alive}
    assert all(after[i] > before[i] for i in alive), (before, after)  # the survivors took over


def test_replica_lists_and_targets() -> None:
    assert resolve_target("127.0.0.1:1,127.0.0.2:2") == "ipv4:127.0.0.1:1,127.0.0.2:2"
    assert resolve_target("[::1]:1,[::1]:2") == "ipv6:[::1]:1,[::1]:2"
    assert resolve_target("policy:50051") == "policy:50051"
    assert resolve_target("dns:///policy.svc:50051") == "dns:///policy.svc:50051"
    with pytest.raises(SplitedgeError, match="dns:///"):
        resolve_target("a.example:1,b.example:1")
    with pytest.raises(SplitedgeError, match="all IPv4 or all IPv6"):
        resolve_target("127.0.0.1:1,[::1]:2")


def test_reconnects_while_acting_faster_than_the_backoff(tiny_bundle: Path) -> None:
    from server.app import create_server
    from server.config import ServerConfig

    cfg = ServerConfig(bundle=tiny_bundle, port=free_port())
    server, _ = create_server(cfg)
    server.start()
    frame = np.zeros((3, 48, 48), np.uint8)
    client = PolicyClient(
        load_bundle(tiny_bundle), ClientConfig(server=cfg.address, backend="ort")
    ).connect()
    try:
        client.act(frame)
        server.close()  # the server restarts: the client's stream breaks
        server.servicer.close()
        server, _ = create_server(cfg)
        server.start()
        # acting every STEP_S, faster than the backoff: it must still reconnect (bug: each act
        # during the backoff re-armed it, so it never did). Polled up to LIMIT_S, 30x the
        # longest backoff, rather than for a fixed 2 s that a loaded machine may not fit.
        end = time.monotonic() + LIMIT_S
        while time.monotonic() < end:
            client.act(frame)
            if client.reconnects >= 1 and not client.last.fallback:  # type: ignore[union-attr]
                break
            time.sleep(STEP_S)
        assert client.reconnects >= 1 and not client.last.fallback  # type: ignore[union-attr]
    finally:
        client.close()
        server.close()
        server.servicer.close()


DNS_FLEET = """
import json, sys
from pathlib import Path
import numpy as np
from edge.client import ClientConfig, PolicyClient
from server.app import create_server
from server.config import ServerConfig
from splitedge.bundle import load_bundle

port, bundle = int(sys.argv[1]), Path(sys.argv[2])
servers = []
for ip in ("127.0.0.2", "127.0.0.3"):  # two replicas, one DNS name with a record for each
    server, _ = create_server(ServerConfig(bundle=bundle, host=ip, port=port))
    server.start()
    servers.append(server)
b = load_bundle(bundle)
frame = np.zeros(b.policy["observation"]["shape"], np.uint8)
cfg = ClientConfig(server=f"dns:///policy.test:{port}", backend="ort", rpc="unary")
with PolicyClient(b, cfg).connect() as client:
    for _ in range(40):
        client.act(frame)
    fallbacks = client.fallbacks
print(json.dumps({"decisions": [s.servicer.stats()["decisions"] for s in servers],
                  "fallbacks": fallbacks}))
for s in servers:
    s.close()
"""


@pytest.mark.skipif(
    sys.platform != "linux" or not Path("/usr/bin/unshare").exists() or os.geteuid() != 0,
    reason="needs root and unshare(1) for a private /etc/hosts",
)
def test_round_robin_over_the_records_of_one_dns_name(tmp_path: Path) -> None:
    """`dns:///name:port` with two A records: gRPC's resolver returns both and round_robin
    spreads one device's calls over them. The name lives in a private /etc/hosts (a mount
    namespace), which both of gRPC's resolvers read."""
    import json
    import subprocess

    hosts = tmp_path / "hosts"
    hosts.write_text("127.0.0.1 localhost\n127.0.0.2 policy.test\n127.0.0.3 policy.test\n")
    script = tmp_path / "dns_fleet.py"
    script.write_text(DNS_FLEET)
    inner = f"mount --bind {hosts} /etc/hosts && exec {sys.executable} {script} " \
        f"{free_port()} {ZOO_BUNDLE}"  # fmt: skip
    out = subprocess.run(
        ["unshare", "-m", "sh", "-c", inner],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=Path(__file__).resolve().parents[1],
        env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])},
    )
    assert out.returncode == 0, out.stderr[-2000:]
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["fallbacks"] == 0
    a, b = result["decisions"]
    assert a + b == 40 and min(a, b) >= 10, result  # both records served: not pick-first
