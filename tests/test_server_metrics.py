"""The Prometheus endpoint counts exactly what the test sent: requests and errors by code,
batch sizes, queue/compute times per model, connected sessions, open streams."""

from __future__ import annotations

import queue
import urllib.request
from pathlib import Path

import numpy as np
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
