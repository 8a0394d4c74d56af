"""Property: whatever ActRequest (or bytes) arrives, unary or streamed, the server answers with
an action or a clear client-error status, never dies, and keeps serving correct actions."""

from __future__ import annotations

import io
from collections.abc import Iterator
from typing import Any

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from protos import policy_pb2 as pb
from tests.conftest import ZOO_BUNDLE
from tests.test_server import Served, T, action_of, feature_tensor, reference, session, start, stop

# statuses that say "your request is wrong"; INTERNAL or UNKNOWN would be a server bug
CLIENT_ERRORS = {
    grpc.StatusCode.INVALID_ARGUMENT,
    grpc.StatusCode.FAILED_PRECONDITION,
    grpc.StatusCode.RESOURCE_EXHAUSTED,
}
SCALE = 0.03137254901960784  # the zoo bundle's feature scale (its manifest)
FUZZ = settings(
    max_examples=150,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)


@pytest.fixture(scope="module")
def served() -> Iterator[Served]:
    s = start(ZOO_BUNDLE)
    s.sids = {"split": session(s), "raw": session(s, raw=True)}  # type: ignore[attr-defined]
    yield s
    stop(s)


def _png(shape: tuple[int, int, int]) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.zeros((shape[1], shape[2], shape[0]), np.uint8).squeeze()).save(buf, "PNG")
    return buf.getvalue()


shapes = st.one_of(
    st.just([64]),
    st.just([3, 48, 48]),
    st.lists(st.integers(-(2**63), 2**63 - 1), max_size=4),
    st.lists(st.integers(0, 70), max_size=4),
)
payloads = st.one_of(
    st.binary(max_size=256),
    st.sampled_from([bytes(64), bytes(256), bytes(6912), _png((3, 48, 48)), _png((3, 8, 8))]),
    st.binary(min_size=64, max_size=64),
    st.binary(min_size=6912, max_size=6912),
)
tensors = st.builds(
    pb.Tensor,
    shape=shapes,
    dtype=st.integers(0, 8),  # the enum is open: unknown values reach the server
    data=payloads,
    scale=st.one_of(st.just(SCALE), st.floats(width=32)),
    zero_point=st.one_of(st.just(0), st.integers(-(2**31), 2**31 - 1)),
    codec=st.integers(0, 4),
)


FIELDS = {
    "shape": shapes,
    "dtype": st.integers(0, 8),
    "data": payloads,
    "scale": st.floats(width=32),
    "zero_point": st.integers(-(2**31), 2**31 - 1),
    "codec": st.integers(0, 4),
}


@st.composite
def near_valid(draw: Any) -> tuple[str, pb.Tensor]:
    """A correct features or frame tensor (frames raw or PNG) with up to two fields changed."""
    kind = draw(st.sampled_from(["split", "raw"]))
    if kind == "split":
        t = pb.Tensor(
            shape=[64], dtype=pb.UINT8, data=draw(st.binary(min_size=64, max_size=64)), scale=SCALE
        )
    elif draw(st.booleans()):
        t = pb.Tensor(
            shape=[3, 48, 48], dtype=pb.UINT8, data=draw(st.binary(min_size=6912, max_size=6912))
        )
    else:
        t = pb.Tensor(shape=[3, 48, 48], dtype=pb.UINT8, data=_png((3, 48, 48)), codec=pb.CODEC_PNG)
    for name in draw(st.lists(st.sampled_from(sorted(FIELDS)), max_size=2, unique=True)):
        value = draw(FIELDS[name])
        if name == "shape":
            del t.shape[:]
            t.shape.extend(value)
        else:
            setattr(t, name, value)
    return kind, t


@st.composite
def requests(draw: Any) -> tuple[str, pb.ActRequest]:
    """(session kind, request): mostly near-valid inputs on the right session, some wild ones."""
    request = pb.ActRequest(step=draw(st.integers(0, 2**64 - 1)))
    if draw(st.integers(0, 3)) > 0:
        kind, tensor = draw(near_valid())
        request.input.CopyFrom(tensor)
    else:
        kind = draw(st.sampled_from(["split", "raw", "any"]))
        if draw(st.booleans()):
            request.input.CopyFrom(draw(tensors))
    if kind == "any" or draw(st.integers(0, 9)) == 0:
        kind, request.session_id = "any", draw(st.integers(0, 2**64 - 1))
    return kind, request


def _with_session(served: Served, kind: str, request: pb.ActRequest) -> pb.ActRequest:
    if kind != "any" and not request.session_id:
        request.session_id = served.sids[kind]  # type: ignore[attr-defined]
    return request


def _check_reply(served: Served, request: pb.ActRequest, reply: pb.ActReply) -> None:
    assert reply.step == request.step and action_of(reply) in (0, 1)
    t = request.input
    if request.session_id == served.sids["split"] and t.dtype == pb.UINT8 and t.codec == 0:  # type: ignore[attr-defined]
        q = np.frombuffer(t.data, np.uint8)[None]
        assert action_of(reply) == int(reference(served.bundle, "head.onnx", q)[0])


@FUZZ
@given(case=requests())
def test_any_unary_request_gets_an_action_or_a_client_error(
    served: Served, case: tuple[str, pb.ActRequest]
) -> None:
    request = _with_session(served, *case)
    try:
        reply = served.stub.Act(request, timeout=T)
    except grpc.RpcError as e:
        assert e.code() in CLIENT_ERRORS and e.details(), (e.code(), e.details())
    else:
        _check_reply(served, request, reply)


@FUZZ
@given(cases=st.lists(requests(), min_size=1, max_size=3))
def test_any_stream_gets_actions_until_a_client_error(
    served: Served, cases: list[tuple[str, pb.ActRequest]]
) -> None:
    sent = [_with_session(served, *c) for c in cases]
    got = []
    try:
        for reply in served.stub.ActStream(iter(sent), timeout=T):
            got.append(reply)
    except grpc.RpcError as e:
        assert e.code() in CLIENT_ERRORS and e.details(), (e.code(), e.details())
    for request, reply in zip(sent, got, strict=False):  # in order, one reply per request
        _check_reply(served, request, reply)


@settings(
    max_examples=60,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
@given(data=st.binary(max_size=512))
def test_arbitrary_bytes_get_a_status(served: Served, data: bytes) -> None:
    act = served.channel.unary_unary("/splitedge.v1.Policy/Act")
    try:
        reply = pb.ActReply.FromString(act(data, timeout=T))
    except grpc.RpcError as e:
        assert e.code() is not None and e.code() != grpc.StatusCode.DEADLINE_EXCEEDED
    else:
        assert action_of(reply) in (0, 1)  # bytes that happened to parse as a valid request


def test_server_still_serves_after_the_fuzzing(served: Served) -> None:
    q = np.arange(64, dtype=np.uint8)
    r = served.stub.Act(
        pb.ActRequest(session_id=session(served), input=feature_tensor(served, q)), timeout=T
    )
    assert action_of(r) == int(reference(served.bundle, "head.onnx", q[None])[0])
    status = health_pb2_grpc.HealthStub(served.channel).Check(
        health_pb2.HealthCheckRequest(), timeout=T
    )
    assert status.status == health_pb2.HealthCheckResponse.SERVING
