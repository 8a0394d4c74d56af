"""The device side: no torch, deadlines with fallback actions, reconnects, the `edge run` command."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
import threading
import time
from concurrent import futures
from pathlib import Path

import grpc
import numpy as np

from edge.client import ClientConfig, PolicyClient
from edge.wire import to_tensor
from protos import policy_pb2 as pb
from protos import policy_pb2_grpc as pb_grpc
from splitedge.bundle import load_bundle
from tests.conftest import ROOT

# Importing any of these makes `import torch` raise: proves the edge path never needs it.
NO_TORCH = "import sys; sys.modules.update({m: None for m in ('torch', 'stable_baselines3', 'models', 'server')});"


def test_edge_modules_import_without_torch() -> None:
    code = NO_TORCH + (
        "import edge.client, edge.agent, edge.envs, edge.encoder.ort, edge.telemetry;"
        "from edge.envs import make_env; make_env('cartpole-pixels', seed=0).reset();"
        "from splitedge.cli import main; print('ok')"
    )
    r = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60
    )
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "ok"


class ScriptedPolicy(pb_grpc.PolicyServicer):
    """A stand-in server whose replies can be delayed, to test deadlines without a real one."""

    def __init__(self) -> None:
        self.open = threading.Event()  # cleared: every reply is held until it is set again
        self.open.set()
        self.action = 1

    def Hello(self, request, context):  # noqa: N802 (gRPC method names)
        return pb.HelloReply(session_id=7, bundle_name=request.bundle_name)

    def _reply(self, request: pb.ActRequest) -> pb.ActReply:
        self.open.wait()
        return pb.ActReply(step=request.step, action=to_tensor(np.array([self.action], np.int64)))

    def Act(self, request, context):  # noqa: N802
        return self._reply(request)

    def ActStream(self, request_iterator, context):  # noqa: N802
        for request in request_iterator:
            yield self._reply(request)


def _scripted_server() -> tuple[grpc.Server, ScriptedPolicy, int]:
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=8))
    servicer = ScriptedPolicy()
    pb_grpc.add_PolicyServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    return server, servicer, port


def _frame() -> np.ndarray:
    return np.zeros((3, 48, 48), np.uint8)


def test_deadline_gives_fallback_then_recovers(tiny_bundle: Path) -> None:
    server, servicer, port = _scripted_server()
    deadline_s = 0.5  # a local reply takes milliseconds: 100x headroom on a loaded machine
    for rpc in ("stream", "unary"):
        cfg = ClientConfig(
            server=f"127.0.0.1:{port}",
            deadline_s=deadline_s,
            rpc=rpc,
            fallback="last",
            backoff_s=(0.01, 0.05),
        )
        with PolicyClient(load_bundle(tiny_bundle), cfg).connect() as client:
            servicer.open.set()
            servicer.action = 1
            assert client.act(_frame()) == 1 and not client.last.fallback, client.last.error
            servicer.open.clear()  # the server holds its reply
            release = threading.Timer(20 * deadline_s, servicer.open.set)  # should act hang
            release.start()
            assert client.act(_frame()) == 1  # the last action, not a hang:
            assert not servicer.open.is_set()  # it came back while the reply was still held
            release.cancel()
            assert client.last.fallback and "DEADLINE" in client.last.error
            servicer.action = 0
            servicer.open.set()  # the held reply drains (and is dropped: its step fell back)
            # Recovers: real actions again, on the same stream (a late reply is not a broken
            # link, issue 19). Polled with a generous limit instead of a fixed sleep.
            fell_back = 0
            end = time.monotonic() + 30
            while (client.act(_frame()), client.last.fallback) != (0, False):
                fell_back += 1
                assert time.monotonic() < end, client.last.error
                time.sleep(0.01)
            assert client.fallbacks == 1 + fell_back
            assert client.reconnects == 0  # (it used to tear the stream down and reconnect)
    server.stop(0)


def test_fixed_fallback_action_when_server_goes_away(tiny_bundle: Path) -> None:
    server, servicer, port = _scripted_server()
    cfg = ClientConfig(
        server=f"127.0.0.1:{port}", deadline_s=0.2, fallback="0", backoff_s=(0.01, 0.05)
    )
    with PolicyClient(load_bundle(tiny_bundle), cfg).connect() as client:
        assert client.act(_frame()) == 1
        server.stop(0).wait()
        results = [client.act(_frame()) for _ in range(5)]
        assert results == [0] * 5 and client.fallbacks == 5


def test_edge_run_command_without_torch(tiny_bundle: Path, tmp_path: Path) -> None:
    from deploy.server_process import ServerProcess

    outs = []
    with ServerProcess(tiny_bundle) as srv:
        for run in ("a", "b"):
            code = NO_TORCH + (
                "from splitedge.cli import main;"
                f"raise SystemExit(main(['edge', 'run', '--bundle', {str(tiny_bundle)!r}, "
                f"'--server', {srv.address!r}, '--steps', '40', '--json', "
                f"'--actions-out', {str(tmp_path / run)!r}]))"
            )
            r = subprocess.run(
                [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120
            )
            assert r.returncode == 0, r.stderr
            outs.append(json.loads(r.stdout))
    out = outs[0]
    assert out["steps"] == 40 and out["fallbacks"] == 0
    assert 0 < out["peak_rss_mb"] < 400  # a Pi Zero 2 W has 512 MB in all
    assert out["bytes_up"] < 200 < 6912  # features, not frames
    # the action log: one action per step, its digest the file's; the same seed, the same run
    lines = (tmp_path / "a").read_text().splitlines()
    assert len(lines) == 40 and {json.loads(x) for x in lines} <= {0, 1}
    assert out["actions_sha256"] == hashlib.sha256((tmp_path / "a").read_bytes()).hexdigest()
    assert outs[1]["actions_sha256"] == out["actions_sha256"]


def test_concurrent_threads_can_share_nothing_but_the_bundle(tiny_bundle: Path) -> None:
    server, _, port = _scripted_server()
    bundle = load_bundle(tiny_bundle)
    errors: list[BaseException] = []

    def worker() -> None:
        try:
            with PolicyClient(bundle, ClientConfig(server=f"127.0.0.1:{port}")).connect() as c:
                for _ in range(20):
                    assert c.act(_frame()) == 1
        except BaseException as e:  # surfaced below
            errors.append(e)

    threads = [threading.Thread(target=worker) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    server.stop(0)
    assert not errors


def test_act_without_connect_and_after_reconnect_uses_the_live_session(tiny_bundle: Path) -> None:
    from deploy.server_process import ServerProcess

    frame = _frame()
    with ServerProcess(tiny_bundle) as srv:
        cfg = ClientConfig(server=srv.address, deadline_s=5.0, backoff_s=(0.01, 0.02))
        client = PolicyClient(load_bundle(tiny_bundle), cfg)  # no connect(): act() must do it
        client.act(frame)
        assert not client.last.fallback, client.last.error
        first_session = client._session
        client._schedule_reconnect()  # as after a dropped link
        time.sleep(0.05)
        client.act(frame)
        assert not client.last.fallback, client.last.error
        assert client._session != first_session and client.reconnects == 2
        client.close()
