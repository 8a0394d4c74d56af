"""The Prometheus endpoint counts exactly what the test sent: requests and errors by code,
batch sizes, queue/compute times per model, connected sessions, open streams."""

from __future__ import annotations

import queue
import urllib.request
from pathlib import Path

import numpy as np
import pytest
from prometheus_client.parser import text_string_to_metric_families

from protos import policy_pb2 as pb
from tests.test_server import T, feature_tensor, frame_tensor, session, start, stop


def scrape(port: int) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    """Every sample as {(name, labels): value}."""
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=T).read().decode()
    return {
        (s.name, frozenset(s.labels.items())): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def value(
    samples: dict[tuple[str, frozenset[tuple[str, str]]], float], name: str, **labels: str
) -> float:
    return samples.get((name, frozenset(labels.items())), 0.0)


def test_metrics_count_what_was_sent(tiny_bundle: Path) -> None:
    s = start(tiny_bundle, metrics_port=0)
    try:
        port = s.server.metrics_port
        assert port
        a, b, raw = session(s), session(s), session(s, raw=True)
        feats = np.random.default_rng(0).integers(0, 256, (9, 64), dtype=np.uint8)
        frame = np.zeros(s.obs_shape, np.uint8)
        for q in feats[:5]:
            s.stub.Act(pb.ActRequest(session_id=a, input=feature_tensor(s, q)), timeout=T)
        stream_requests = [
            pb.ActRequest(session_id=b, input=feature_tensor(s, q)) for q in feats[5:8]
        ]
        assert len(list(s.stub.ActStream(iter(stream_requests), timeout=T))) == 3
        for _ in range(2):
            s.stub.Act(pb.ActRequest(session_id=raw, input=frame_tensor(frame)), timeout=T)
        bad = pb.Tensor(shape=[2], dtype=pb.UINT8, data=b"\0\0")
        for sid in (a, a, a, 999):  # 3 x INVALID_ARGUMENT (shape), 1 x FAILED_PRECONDITION
            try:
                s.stub.Act(pb.ActRequest(session_id=sid, input=bad), timeout=T)
            except Exception:
                pass
        # one stream left open (one message answered) while we scrape
        pending: queue.Queue[pb.ActRequest | None] = queue.Queue()
        open_call = s.stub.ActStream(iter(pending.get, None), timeout=T)
        pending.put(pb.ActRequest(session_id=b, input=feature_tensor(s, feats[8])))
        next(open_call)
        m = scrape(port)
        pending.put(None)
        list(open_call)
        after = scrape(port)
    finally:
        stop(s)

    req, err = "splitedge_requests_total", "splitedge_errors_total"
    assert value(m, req, method="Hello", code="OK") == 3
    assert value(m, req, method="Act", code="OK") == 7
    assert value(m, req, method="ActStream", code="OK") == 4
    assert value(m, req, method="Act", code="INVALID_ARGUMENT") == 3
    assert value(m, err, method="Act", code="INVALID_ARGUMENT") == 3
    assert value(m, err, method="Act", code="FAILED_PRECONDITION") == 1
    assert value(m, err, method="Act", code="OK") == 0
    # 9 feature decisions through head.onnx, 2 frames through full.onnx
    for model, n in (("head", 9), ("full", 2)):
        assert value(m, "splitedge_batch_size_sum", model=model) == n
        calls = value(m, "splitedge_batch_size_count", model=model)
        assert 1 <= calls <= n
        assert value(m, "splitedge_compute_seconds_count", model=model) == calls
        assert value(m, "splitedge_queue_seconds_count", model=model) == n
        assert value(m, "splitedge_queue_seconds_sum", model=model) >= 0
    assert value(m, "splitedge_sessions") == 3
    assert value(m, "splitedge_open_streams") == 1 and value(after, "splitedge_open_streams") == 0
    assert value(m, "splitedge_serving") == 1
    info = [k for k in m if k[0] == "splitedge_bundle_info"]
    assert len(info) == 1 and dict(info[0][1])["name"] == "tiny-cartpole"


def _get(url: str, **headers: str) -> tuple[int, str]:
    import urllib.error

    try:
        with urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=T) as r:
            return int(r.status), r.read().decode()
    except urllib.error.HTTPError as e:
        return int(e.code), e.read().decode()


def test_a_thousand_idle_connections_cost_no_threads(tiny_bundle: Path) -> None:
    """The endpoint is one event loop: idle connections hold a descriptor for at most its
    5 s request timeout, past its cap of 64 they are closed on arrival, and no thread is
    made for any of them (the old one-thread-per-connection server made 1,015)."""
    import socket
    import threading
    import time

    import psutil

    s = start(tiny_bundle, metrics_port=0)
    me = psutil.Process()
    try:
        port = s.server.metrics_port
        threads = me.num_threads()
        idle = [socket.create_connection(("127.0.0.1", port)) for _ in range(1000)]
        time.sleep(0.5)
        during = me.num_threads()
        assert s.stub.Hello is not None and session(s) > 0  # gRPC unaffected meanwhile
        t0 = time.monotonic()
        while True:  # served again once the idle ones time out (5 s), well within 10x
            try:
                status, _ = _get(f"http://127.0.0.1:{port}/metrics")
                if status == 200:
                    break
            except OSError:
                pass
            assert time.monotonic() - t0 < 50
            time.sleep(0.25)
        waited = time.monotonic() - t0
        for sock in idle:
            sock.close()
    finally:
        stop(s)
    print(
        f"\nthreads {threads} -> {during} with 1000 idle metrics connections; scrape OK after {waited:.1f} s"
    )
    assert during <= threads + 1 and threading.active_count() < 100


def test_ready_turns_503_the_moment_drain_starts(tiny_bundle: Path) -> None:
    s = start(tiny_bundle, metrics_port=0)
    try:
        base = f"http://127.0.0.1:{s.server.metrics_port}"
        assert _get(f"{base}/ready") == (200, "ready\n") and _get(f"{base}/live")[0] == 200
        done = s.server.stop(5.0)  # drain starts; the listener stays for its settle time
        status = [_get(f"{base}/ready")[0] for _ in range(3)]
        assert 503 in status and status[-1] == 503, status
        assert value(scrape(s.server.metrics_port), "splitedge_serving") == 0
        assert done.wait(T)
    finally:
        stop(s)


def test_metrics_token_and_tls(tiny_bundle: Path, tmp_path: Path) -> None:
    import ssl

    from splitedge.commands.certs import make_certs

    make_certs(tmp_path, ["pi-01"], [])
    (tmp_path / "metrics.token").write_text("s3cret\n")
    s = start(tiny_bundle, metrics_port=0, metrics_token=tmp_path / "metrics.token",
              metrics_tls=True, tls_cert=tmp_path / "server.pem", tls_key=tmp_path / "server.key")  # fmt: skip
    try:
        base = f"https://localhost:{s.server.metrics_port}"
        ctx = ssl.create_default_context(cafile=str(tmp_path / "ca.pem"))
        opener = urllib.request.build_opener(urllib.request.HTTPSHandler(context=ctx))
        urllib.request.install_opener(opener)
        assert _get(f"{base}/metrics")[0] == 401
        assert _get(f"{base}/metrics", Authorization="Bearer wrong")[0] == 401
        status, text = _get(f"{base}/metrics", Authorization="Bearer s3cret")
        assert status == 200 and "splitedge_serving 1.0" in text
        assert _get(f"{base}/ready")[0] == 200  # probes need no token
        with pytest.raises(OSError):  # plain HTTP to the TLS endpoint
            urllib.request.urlopen(f"http://127.0.0.1:{s.server.metrics_port}/ready", timeout=T)
    finally:
        urllib.request.install_opener(urllib.request.build_opener())
        stop(s)


def test_metrics_listen_on_loopback_by_default_and_bind_errors_name_the_cause(
    tiny_bundle: Path,
) -> None:
    import errno
    import socket
    import subprocess
    import sys

    from server.config import ServerConfig
    from server.http import bind_failure
    from tests.conftest import ROOT

    assert ServerConfig(bundle=tiny_bundle).metrics_host == "127.0.0.1"
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        r = subprocess.run(
            [sys.executable, "-m", "splitedge", "serve", "--bundle", str(tiny_bundle),
             "--port", "0", "--metrics-port", str(port)],
            cwd=ROOT, capture_output=True, text=True, timeout=60,
        )  # fmt: skip
    assert r.returncode == 2 and "Traceback" not in r.stderr
    line = r.stderr.strip().splitlines()[-1]
    assert f"cannot listen on 127.0.0.1:{port} (the port is in use" in line, r.stderr
    denied = bind_failure(
        "0.0.0.0", 80, PermissionError(errno.EACCES, "Permission denied"), "--metrics-port"
    )
    assert "permission denied: ports below 1024 need root or CAP_NET_BIND_SERVICE" in str(denied)
    assert "in use" not in str(denied)
