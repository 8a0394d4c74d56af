"""`serve()` and `splitedge serve`: start, answer health checks, stop cleanly; config and bundle errors."""

from __future__ import annotations

import os
import re
import select
import signal
import socket
import subprocess
import sys
import threading
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from server.app import PolicyServer, serve
from server.config import ServerConfig
from splitedge.errors import SplitedgeError
from tests.conftest import ROOT
from tests.test_server import T

SERVING = health_pb2.HealthCheckResponse.SERVING


def _health(port: int, service: str = "") -> int:
    with grpc.insecure_channel(f"127.0.0.1:{port}") as ch:
        stub = health_pb2_grpc.HealthStub(ch)
        return int(stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=T).status)


def test_serve_runs_until_stopped_then_returns_zero(tiny_bundle: Path) -> None:
    stop, ready = threading.Event(), threading.Event()
    ports: list[int] = []
    result: list[int] = []

    def on_ready(servicer: object, server: PolicyServer) -> None:
        ports.append(server.port)
        ready.set()

    th = threading.Thread(
        target=lambda: result.append(
            serve(ServerConfig(bundle=tiny_bundle, grace_s=1.0), on_ready=on_ready, stop=stop)
        )
    )
    th.start()
    assert ready.wait(30)
    assert _health(ports[0], "splitedge.v1.Policy") == SERVING
    stop.set()
    th.join(30)
    assert not th.is_alive() and result == [0]
    with pytest.raises(grpc.RpcError) as info:  # the port is really closed
        _health(ports[0])
    assert info.value.code() == grpc.StatusCode.UNAVAILABLE


def test_cli_serves_prints_one_line_and_exits_zero_on_sigterm(tiny_bundle: Path) -> None:
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "splitedge",
            "serve",
            "--bundle",
            str(tiny_bundle),
            "--port",
            "0",
            "--grace-s",
            "1",
        ],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    try:
        readable, _, _ = select.select([proc.stdout], [], [], 60)
        assert readable, "no startup line within 60 s"
        assert proc.stdout is not None
        line = proc.stdout.readline().strip()
        m = re.fullmatch(
            r"serving tiny-cartpole 0\.0\.1 \(encoder ([0-9a-f]{12})\) on 127\.0\.0\.1:(\d+) "
            r"— health and reflection on",
            line,
        )
        assert m, line
        assert _health(int(m.group(2))) == SERVING
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "splitedge", "serve", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_cli_refuses_a_missing_bundle_and_bad_options_in_one_line(
    tmp_path: Path, tiny_bundle: Path
) -> None:
    r = _cli("--bundle", str(tmp_path / "nope"), "--port", "0")
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert r.stderr.strip().count("\n") == 0 and "not found" in r.stderr
    r = _cli("--bundle", str(tiny_bundle), "--port", "0", "--max-batch", "0")
    assert (
        r.returncode == 2
        and "max_batch must be >= 1, got 0" in r.stderr
        and "Traceback" not in r.stderr
    )


def test_busy_port_is_a_clear_error(tiny_bundle: Path) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        with pytest.raises(SplitedgeError, match=f"cannot listen on 127.0.0.1:{port}"):
            serve(ServerConfig(bundle=tiny_bundle, port=port), stop=threading.Event())


def test_a_non_policy_directory_is_refused(tmp_path: Path) -> None:
    with pytest.raises(SplitedgeError, match="not a bundle"):
        serve(ServerConfig(bundle=tmp_path), stop=threading.Event())


@pytest.mark.parametrize(
    ("field", "value", "shown"),
    [
        ("port", 70000, "got 70000"),
        ("max_batch", 0, "got 0"),
        ("max_delay_ms", -1.0, "got -1.0"),
        ("max_delay_ms", float("nan"), "got nan"),
        ("max_message_bytes", 10, "got 10"),
        ("workers", 0, "got 0"),
        ("grace_s", -2.0, "got -2.0"),
        ("ort_threads", 0, "got 0"),
        ("host", "", "got ''"),
    ],
)
def test_config_errors_show_the_value(field: str, value: object, shown: str) -> None:
    with pytest.raises(ValueError, match=re.escape(shown)):
        ServerConfig(bundle=Path("b"), **{field: value})  # type: ignore[arg-type]


def test_config_defaults() -> None:
    cfg = ServerConfig(bundle="b")  # type: ignore[arg-type]
    assert cfg.bundle == Path("b") and cfg.address == "127.0.0.1:0"
    assert (
        cfg.max_batch,
        cfg.max_delay_ms,
        cfg.max_message_bytes,
        cfg.workers,
        cfg.grace_s,
        cfg.ort_threads,
    ) == (64, 0.0, None, 32, 5.0, 1)  # None: derived from the bundle (server/limits.py)
    assert ServerConfig(bundle=Path("b"), host="::1", port=5).address == "[::1]:5"


def test_server_imports_no_torch_edge_or_models() -> None:
    code = (
        "import sys; sys.modules.update({m: None for m in ('torch', 'stable_baselines3', 'models', 'edge')});"
        "import server.app, server.servicer, splitedge.commands.serve; print('ok')"
    )
    r = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60
    )
    assert r.returncode == 0 and r.stdout.strip() == "ok", r.stderr
