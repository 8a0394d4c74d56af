"""Signals (issue 19): SIGHUP drains like SIGTERM; every unary call in flight when SIGTERM
arrives is answered OK (none CANCELLED), while clients keep calling through the drain."""

from __future__ import annotations

import json
import signal
import threading
import time
from collections import Counter

import grpc
import numpy as np
import pytest

from deploy.bench_server import ChildServer
from deploy.server_process import free_port, serve_argv
from protos import policy_pb2 as pb
from protos import policy_pb2_grpc as pb_grpc
from tests.conftest import ZOO_BUNDLE
from tests.test_server import T, action_of, reference

MANIFEST = json.loads((ZOO_BUNDLE / "manifest.json").read_text())
OUT = MANIFEST["policy"]["encoder"]["output"]


def _hello() -> pb.HelloRequest:
    spec = pb.TensorSpec(
        shape=[64], dtype=pb.UINT8, scale=OUT["scale"], zero_point=OUT["zero_point"]
    )
    return pb.HelloRequest(bundle_name=MANIFEST["name"], feature_spec=spec,
                           encoder_digest=MANIFEST["policy"]["encoder"]["digest"])  # fmt: skip


def _tensor(q: np.ndarray) -> pb.Tensor:
    return pb.Tensor(shape=[64], dtype=pb.UINT8, data=q.tobytes(), scale=OUT["scale"],
                     zero_point=OUT["zero_point"])  # fmt: skip


def test_sighup_drains_like_sigterm() -> None:
    port = free_port()
    hold_s = 3.0  # the batcher holds the first request this long: in flight at the signal
    server = ChildServer(
        serve_argv(ZOO_BUNDLE, port, "--max-batch", "100", "--max-delay-ms", str(hold_s * 1e3),
                   "--grace-s", "30"),
        f"127.0.0.1:{port}",
    )  # fmt: skip
    q = np.arange(64, dtype=np.uint8)
    want = int(reference(ZOO_BUNDLE, "head.onnx", q[None])[0])
    try:
        with grpc.insecure_channel(server.address) as ch:
            stub = pb_grpc.PolicyStub(ch)
            sid = stub.Hello(_hello(), timeout=T).session_id
            held = stub.Act.future(pb.ActRequest(session_id=sid, input=_tensor(q)), timeout=T)
            time.sleep(0.5)
            assert not held.done()
            server.proc.send_signal(signal.SIGHUP)
            assert action_of(held.result(timeout=T)) == want  # answered, not killed
            assert server.proc.wait(timeout=T) == 0
    finally:
        err = server.stop()
    assert "draining" in err and "signal=SIGHUP" in err, err


@pytest.mark.parametrize("round_", range(2))
def test_unary_calls_in_flight_at_sigterm_are_all_answered(round_: int) -> None:
    port = free_port()
    server = ChildServer(serve_argv(ZOO_BUNDLE, port, "--grace-s", "10"), f"127.0.0.1:{port}")
    feats = np.random.default_rng(round_).integers(0, 256, (16, 64), dtype=np.uint8)
    want = reference(ZOO_BUNDLE, "head.onnx", feats).tolist()
    calls: list[tuple[float, str, bool]] = []  # (started, code, right action)
    lock, stop = threading.Lock(), threading.Event()

    def client() -> None:
        with grpc.insecure_channel(server.address) as ch:
            stub = pb_grpc.PolicyStub(ch)
            sid = stub.Hello(_hello(), timeout=T).session_id
            i = 0
            while not stop.is_set():
                started = time.monotonic()
                try:
                    reply = stub.Act(pb.ActRequest(session_id=sid, input=_tensor(feats[i % 16])),
                                     timeout=T)  # fmt: skip
                    result = ("OK", action_of(reply) == want[i % 16])
                except grpc.RpcError as e:
                    result = (e.code().name, True)
                with lock:
                    calls.append((started, *result))
                if result[0] != "OK":
                    return  # refused: a real client would go to another replica
                i += 1

    threads = [threading.Thread(target=client, daemon=True) for _ in range(6)]
    try:
        for th in threads:
            th.start()
        time.sleep(1.5)
        t_term = time.monotonic()
        server.proc.send_signal(signal.SIGTERM)
        assert server.proc.wait(timeout=30) == 0
        stop.set()
        for th in threads:
            th.join(T)
    finally:
        server.stop()
    before = Counter(code for started, code, _ in calls if started < t_term)
    after = Counter(code for started, code, _ in calls if started >= t_term)
    print(f"\nSIGTERM: calls started before it {dict(before)}, after it {dict(after)}")
    assert all(right for *_, right in calls)
    assert set(before) == {"OK"} and before["OK"] > 0  # in flight at SIGTERM: answered
    assert set(after) <= {"OK", "UNAVAILABLE"}  # later ones: answered or refused to retry
