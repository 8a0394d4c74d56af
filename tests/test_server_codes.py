"""Status codes for what gRPC would otherwise answer badly (issue 19): bytes that are not
protobuf get INVALID_ARGUMENT (not UNKNOWN with an exception's text), unary and mid-stream,
and are counted; a client's long values are echoed clipped, so the real error fits in the
trailers (not RESOURCE_EXHAUSTED for a 16 KB trailer); health watches are capped."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from typing import Any

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from protos import policy_pb2 as pb
from tests.conftest import ZOO_BUNDLE
from tests.test_server import (
    Served,
    T,
    action_of,
    feature_tensor,
    hello_request,
    reference,
    session,
    start,
    stop,
)
from tests.test_server_metrics import scrape, value

INVALID = grpc.StatusCode.INVALID_ARGUMENT
GARBAGE = b"\xff\xff\xff\xff\x0f"  # a truncated varint: no protobuf parser accepts it
MAX_DETAILS = 600  # a clipped message: well under gRPC's 8 KiB trailer budget


@pytest.fixture(scope="module")
def served() -> Iterator[Served]:
    s = start(ZOO_BUNDLE, metrics_port=0, max_health_watches=3)
    yield s
    stop(s)


def _raw(s: Served, method: str, streaming: bool = False) -> Any:
    """A callable sending bytes as they are to /splitedge.v1.Policy/<method>."""
    path = f"/splitedge.v1.Policy/{method}"
    ident = lambda b: b  # noqa: E731
    if streaming:
        return s.channel.stream_stream(path, request_serializer=ident, response_deserializer=ident)
    return s.channel.unary_unary(path, request_serializer=ident, response_deserializer=ident)


def _error(call: Any, *args: Any) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as info:
        result = call(*args, timeout=T)
        if not isinstance(result, bytes | pb.ActReply | pb.HelloReply):
            list(result)
    return info.value


@pytest.mark.parametrize("method", ["Hello", "Act"])
def test_undecodable_unary_request_is_invalid_argument_and_counted(
    served: Served, method: str
) -> None:
    before = value(scrape(served.server.metrics_port), "splitedge_errors_total",
                   method=method, code="INVALID_ARGUMENT")  # fmt: skip
    e = _error(_raw(served, method), GARBAGE)
    assert e.code() == INVALID, e.details()
    assert "not a valid splitedge.v1." in e.details() and len(e.details()) < MAX_DETAILS
    after = value(scrape(served.server.metrics_port), "splitedge_errors_total",
                  method=method, code="INVALID_ARGUMENT")  # fmt: skip
    assert after == before + 1


def test_undecodable_message_mid_stream_ends_only_that_stream(served: Served) -> None:
    sid = session(served)
    q = np.arange(64, dtype=np.uint8)
    good = pb.ActRequest(
        session_id=sid, step=1, input=feature_tensor(served, q)
    ).SerializeToString()
    before = value(scrape(served.server.metrics_port), "splitedge_errors_total",
                   method="ActStream", code="INVALID_ARGUMENT")  # fmt: skip
    replies: list[bytes] = []
    with pytest.raises(grpc.RpcError) as info:
        for reply in _raw(served, "ActStream", streaming=True)(
            iter([good, GARBAGE, good]), timeout=T
        ):
            replies.append(reply)
    assert (
        info.value.code() == INVALID
        and "not a valid splitedge.v1.ActRequest" in info.value.details()
    )
    assert len(replies) == 1  # the reply before the bad message, nothing after it
    want = reference(ZOO_BUNDLE, "head.onnx", q[None])[0]
    assert action_of(pb.ActReply.FromString(replies[0])) == want
    after = value(scrape(served.server.metrics_port), "splitedge_errors_total",
                  method="ActStream", code="INVALID_ARGUMENT")  # fmt: skip
    assert after == before + 1
    r = served.stub.Act(pb.ActRequest(session_id=sid, input=feature_tensor(served, q)), timeout=T)
    assert action_of(r) == want  # the server and the session carry on


def test_long_client_values_are_echoed_clipped(served: Served) -> None:
    long_name = "n" * 15_000
    e = _error(
        served.stub.Hello, hello_request(served, bundle_name=long_name, encoder_digest="d" * 64)
    )
    assert e.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "encoder digest mismatch" in e.details() and "(15000 chars)" in e.details()
    assert len(e.details()) < MAX_DETAILS

    sid = session(served)
    shape = [1] * 10_000  # a 10,000-dimension shape
    bad = pb.Tensor(shape=shape, dtype=pb.UINT8, data=b"\0", scale=served.out["scale"],
                    zero_point=served.out["zero_point"])  # fmt: skip
    e = _error(served.stub.Act, pb.ActRequest(session_id=sid, input=bad))
    assert e.code() == INVALID and "shape" in e.details() and len(e.details()) < MAX_DETAILS

    health = health_pb2_grpc.HealthStub(served.channel)
    e = _error(health.Check, health_pb2.HealthCheckRequest(service="s" * 15_000))
    assert e.code() == grpc.StatusCode.NOT_FOUND and len(e.details()) < MAX_DETAILS


def test_health_watches_are_capped(served: Served) -> None:
    stub = health_pb2_grpc.HealthStub(served.channel)
    calls, first = [], []
    for _ in range(3):  # the cap in this server
        call = stub.Watch(health_pb2.HealthCheckRequest(), timeout=T)
        first.append(next(call).status)
        calls.append(call)
    assert first == [health_pb2.HealthCheckResponse.SERVING] * 3
    extra = stub.Watch(health_pb2.HealthCheckRequest(), timeout=T)
    with pytest.raises(grpc.RpcError) as info:
        next(extra)
    assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    m = scrape(served.server.metrics_port)
    assert value(m, "splitedge_health_watches") == 3
    assert value(m, "splitedge_errors_total", method="Watch", code="RESOURCE_EXHAUSTED") == 1
    calls[0].cancel()
    for _ in range(100):  # the server notices the cancel on its own time
        again = stub.Watch(health_pb2.HealthCheckRequest(), timeout=T)
        try:
            next(again)
            break
        except grpc.RpcError:
            threading.Event().wait(0.05)
    else:
        pytest.fail("a watch slot never came free")
    for call in [*calls, again]:
        call.cancel()
