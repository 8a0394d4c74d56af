"""Operators can see what the server does (issue 19): with --log-json, one JSON object per
line for start, sessions, refusals by code (at most 10 lines per code per 10 s, then a
count), drain and exit; --log-level warning keeps only warnings."""

from __future__ import annotations

import json
import signal

import grpc
import pytest

from deploy.bench_server import ChildServer
from deploy.server_process import free_port, serve_argv
from protos import policy_pb2 as pb
from protos import policy_pb2_grpc as pb_grpc
from tests.conftest import ZOO_BUNDLE
from tests.test_server import T


def _run(*flags: str, bad_calls: int = 30) -> list[str]:
    port = free_port()
    server = ChildServer(serve_argv(ZOO_BUNDLE, port, *flags), f"127.0.0.1:{port}")
    try:
        with grpc.insecure_channel(server.address) as ch:
            stub = pb_grpc.PolicyStub(ch)
            stub.Hello(pb.HelloRequest(mode=pb.MODE_RAW, client_id="pi-07"), timeout=T)
            for _ in range(bad_calls):  # FAILED_PRECONDITION: no session
                with pytest.raises(grpc.RpcError):
                    stub.Act(pb.ActRequest(session_id=1, input=pb.Tensor()), timeout=T)
        server.proc.send_signal(signal.SIGTERM)
        assert server.proc.wait(timeout=30) == 0
    finally:
        err = server.stop()
    return err.strip().splitlines()


def test_json_logs_tell_start_sessions_refusals_drain_and_exit() -> None:
    lines = _run("--log-json")
    docs = [json.loads(line) for line in lines]  # every line is one JSON object
    events = [d.get("event") for d in docs]
    assert events[0] == "start" and docs[0]["max_request_bytes"] == 17920
    hello = next(d for d in docs if d.get("event") == "hello")
    assert hello["client_id"] == "pi-07" and hello["mode"] == "raw"
    refused = [d for d in docs if d.get("event") == "refused.FAILED_PRECONDITION"]
    assert len(refused) == 10  # 30 refusals in well under 10 s: 10 lines, the rest counted
    assert refused[0]["method"] == "Act" and "call Hello first" in refused[0]["why"]
    drain = next(d for d in docs if d.get("event") == "drain")
    assert drain["signal"] == "SIGTERM" and events[-1] == "exit"
    assert docs[-1]["errors"] == {"FAILED_PRECONDITION": 30}  # the exit line has the count


def test_log_level_warning_keeps_only_warnings() -> None:
    lines = _run("--log-level", "warning", bad_calls=3)
    assert all(" warning " in line or " error " in line for line in lines), lines
