"""Malformed and hostile requests each get a clear status while concurrent clients keep getting
correct actions (issue 2: "the server keeps serving other clients")."""

from __future__ import annotations

import io
import queue
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest
from PIL import Image

from protos import policy_pb2 as pb
from protos import policy_pb2_grpc as pb_grpc
from tests.conftest import ZOO_BUNDLE
from tests.test_server import (
    Served,
    T,
    action_of,
    env_frames,
    feature_tensor,
    frame_tensor,
    hello_request,
    reference,
    session,
    start,
    stop,
)

INVALID = grpc.StatusCode.INVALID_ARGUMENT
PRECONDITION = grpc.StatusCode.FAILED_PRECONDITION


@pytest.fixture(scope="module")
def served() -> Iterator[Served]:
    # the shipped bundle, so the good clients' expected actions are not all the same
    s = start(ZOO_BUNDLE)
    yield s
    stop(s)


class GoodClient(threading.Thread):
    """Keeps acting on its own channel and checks every action against the ONNX reference."""

    def __init__(
        self, s: Served, raw: bool, inputs: np.ndarray, tensors: list[pb.Tensor], model: str
    ):
        super().__init__(daemon=True)
        self.s, self.raw, self.tensors = s, raw, tensors
        self.want = reference(s.bundle, model, inputs).tolist()
        self.ok = 0
        self.errors: list[str] = []
        self.done = threading.Event()
        self.started = threading.Event()

    def run(self) -> None:
        channel = grpc.insecure_channel(f"127.0.0.1:{self.s.port}")
        stub = pb_grpc.PolicyStub(channel)
        requests: queue.Queue[pb.ActRequest | None] = queue.Queue()
        try:
            sid = stub.Hello(hello_request(self.s, raw=self.raw), timeout=T).session_id
            replies = stub.ActStream(
                iter(requests.get, None), timeout=120
            )  # ping-pong on one stream
            step = 0
            while not self.done.is_set():
                i = step % len(self.tensors)
                requests.put(pb.ActRequest(session_id=sid, step=step, input=self.tensors[i]))
                reply = next(replies)
                if reply.step != step or action_of(reply) != self.want[i]:
                    self.errors.append(f"step {step}: got {action_of(reply)}, want {self.want[i]}")
                self.ok += 1
                self.started.set()
                step += 1
            requests.put(None)
        except Exception as e:  # surfaced by the test through self.errors
            self.errors.append(repr(e))
        finally:
            self.started.set()
            channel.close()


def _png(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG")
    return buf.getvalue()


def attacks(
    s: Served, split: int, raw: int
) -> list[tuple[str, Callable[[], object], grpc.StatusCode, str]]:
    """(name, call, expected code, a word the message must contain) for each bad request."""
    out, (c, h, w) = s.out, s.obs_shape
    f = out["shape"][0]
    q = np.zeros(f, np.uint8)
    good_feat = feature_tensor(s, q)
    frame = env_frames(1)[0]
    png = frame_tensor(frame, "png").data

    def act(sid: int, **tensor: object) -> Callable[[], object]:
        return lambda: s.stub.Act(
            pb.ActRequest(session_id=sid, input=pb.Tensor(**tensor)), timeout=T
        )

    def feat(**changes: object) -> Callable[[], object]:
        fields = dict(
            shape=[f],
            dtype=pb.UINT8,
            data=q.tobytes(),
            scale=out["scale"],
            zero_point=out["zero_point"],
        )
        fields.update(changes)
        return act(split, **fields)

    def obs(**changes: object) -> Callable[[], object]:
        fields: dict[str, object] = dict(shape=[c, h, w], dtype=pb.UINT8, data=frame.tobytes())
        fields.update(changes)
        return act(raw, **fields)

    nan = np.zeros(f, "<f4")
    nan[3] = np.nan
    inf = np.full(f, np.inf, "<f4")
    huge_png = _png(np.zeros((4000, 4000), np.uint8))  # a tiny file claiming 16 Mpx
    rgba_png = _png(np.zeros((h, w, 4), np.uint8))
    return [
        ("features: wrong shape", feat(shape=[f + 1], data=bytes(f + 1)), INVALID, "shape"),
        ("features: batch dimension", feat(shape=[1, f]), INVALID, "shape"),
        ("features: wrong dtype", feat(dtype=pb.INT32, data=bytes(4 * f)), INVALID, "dtype"),
        ("features: unknown dtype", feat(dtype=99), INVALID, "dtype"),
        ("features: short data", feat(data=bytes(f - 1)), INVALID, "bytes"),
        ("features: long data", feat(data=bytes(f + 7)), INVALID, "bytes"),
        ("features: NaN", feat(dtype=pb.FLOAT32, data=nan.tobytes(), scale=0.0), INVALID, "NaN"),
        ("features: Inf", feat(dtype=pb.FLOAT32, data=inf.tobytes(), scale=0.0), INVALID, "Inf"),
        ("features: other scale", feat(scale=out["scale"] * 1.01), INVALID, "scale"),
        ("features: as PNG", feat(codec=pb.CODEC_PNG), INVALID, "codec"),
        (
            "no input tensor",
            lambda: s.stub.Act(pb.ActRequest(session_id=split), timeout=T),
            INVALID,
            "input",
        ),
        (
            "unknown session",
            lambda: s.stub.Act(pb.ActRequest(session_id=12345678901, input=good_feat), timeout=T),
            PRECONDITION,
            "Hello",
        ),
        (
            "no session",
            lambda: s.stub.Act(pb.ActRequest(input=good_feat), timeout=T),
            PRECONDITION,
            "Hello",
        ),
        ("frame: wrong byte length", obs(data=frame.tobytes()[:-1]), INVALID, "bytes"),
        ("frame: float dtype", obs(dtype=pb.FLOAT32), INVALID, "dtype"),
        ("frame: wrong shape", obs(shape=[h, w, c]), INVALID, "shape"),
        (
            "frame: garbage PNG",
            obs(codec=pb.CODEC_PNG, data=b"\x89PNG\r\n\x1a\n" + bytes(range(256)) * 4),
            INVALID,
            "PNG",
        ),
        (
            "frame: garbage JPEG",
            obs(codec=pb.CODEC_JPEG, data=b"\xff\xd8\xff" + b"\x00" * 500),
            INVALID,
            "JPEG",
        ),
        (
            "frame: truncated PNG",
            obs(codec=pb.CODEC_PNG, data=png[: len(png) // 2]),
            INVALID,
            "PNG",
        ),
        ("frame: PNG sent as JPEG", obs(codec=pb.CODEC_JPEG, data=png), INVALID, "JPEG"),
        ("frame: 16 Mpx PNG header", obs(codec=pb.CODEC_PNG, data=huge_png), INVALID, "4000x4000"),
        ("frame: RGBA PNG for RGB", obs(codec=pb.CODEC_PNG, data=rgba_png), INVALID, "mode"),
        ("frame: unknown codec", obs(codec=9), INVALID, "codec"),
        ("frame: empty PNG", obs(codec=pb.CODEC_PNG, data=b""), INVALID, "PNG"),
        ("64 MB message", obs(data=bytes(64 << 20)), grpc.StatusCode.RESOURCE_EXHAUSTED, ""),
        (
            "hello: unknown mode",
            lambda: s.stub.Hello(hello_request(s, mode=7), timeout=T),
            INVALID,
            "mode",
        ),
    ]


def test_bad_requests_get_clear_statuses_while_others_keep_acting(served: Served) -> None:
    feats = np.random.default_rng(0).integers(0, 256, (16, *served.out["shape"]), dtype=np.uint8)
    frames = env_frames(16, seed=5)
    good = [
        GoodClient(served, False, feats, [feature_tensor(served, q) for q in feats], "head.onnx"),
        GoodClient(served, True, frames, [frame_tensor(fr, "png") for fr in frames], "full.onnx"),
    ]
    for g in good:
        g.start()
    for g in good:
        assert g.started.wait(T)
    before = [g.ok for g in good]
    split, raw = session(served), session(served, raw=True)
    wrong: list[str] = []
    for name, call, code, word in attacks(served, split, raw):
        with pytest.raises(grpc.RpcError) as info:
            call()
        e = info.value
        if e.code() != code or not e.details() or word not in e.details():
            wrong.append(
                f"{name}: {e.code().name} {e.details()!r}, want {code.name} mentioning {word!r}"
            )
    during = [g.ok - b for g, b in zip(good, before, strict=True)]
    for g in good:
        g.done.set()
        g.join(T)
    assert not wrong, "\n".join(wrong)
    assert all(n > 0 for n in during), during  # both kept acting through the attack...
    assert [g.errors for g in good] == [[], []]  # ...and every action they got was right
    # the server still works for a fresh client, on the sessions the attacker used
    r = served.stub.Act(
        pb.ActRequest(session_id=split, input=feature_tensor(served, feats[0])), timeout=T
    )
    assert action_of(r) == good[0].want[0]


def test_a_bad_message_ends_only_its_own_stream(served: Served) -> None:
    sid = session(served)
    feats = np.random.default_rng(1).integers(0, 256, (3, *served.out["shape"]), dtype=np.uint8)
    want = reference(served.bundle, "head.onnx", feats).tolist()
    bad = pb.Tensor(shape=[1], dtype=pb.UINT8, data=b"\x00")
    requests = [
        pb.ActRequest(session_id=sid, step=i, input=feature_tensor(served, q))
        for i, q in enumerate(feats[:2])
    ]
    requests += [
        pb.ActRequest(session_id=sid, step=2, input=bad),
        pb.ActRequest(session_id=sid, step=3, input=feature_tensor(served, feats[2])),
    ]
    call = served.stub.ActStream(iter(requests), timeout=T)
    got = []
    with pytest.raises(grpc.RpcError) as info:
        for reply in call:
            got.append(action_of(reply))
    assert info.value.code() == INVALID and "shape" in info.value.details()
    assert got == want[:2]  # replies before the bad message arrived; nothing after it
    again = served.stub.ActStream(
        iter([pb.ActRequest(session_id=sid, step=9, input=feature_tensor(served, feats[2]))]),
        timeout=T,
    )
    assert [action_of(r) for r in again] == want[2:]


def test_session_table_is_bounded_and_ids_verify_without_it(tiny_bundle: Path) -> None:
    s = start(tiny_bundle, max_sessions=2)
    try:
        first, second, third = (session(s) for _ in range(3))
        assert len(s.servicer.sessions) == 2  # the table only feeds stats; it stays bounded
        q = np.zeros(s.out["shape"], np.uint8)
        want = reference(s.bundle, "head.onnx", q[None])[0]
        for sid in (first, second, third):  # a forgotten id still verifies (as on another replica)
            r = s.stub.Act(pb.ActRequest(session_id=sid, input=feature_tensor(s, q)), timeout=T)
            assert action_of(r) == want
        for forged in (first ^ 1, 12345, 2**40):  # a flipped tag bit, a made-up id, too big
            with pytest.raises(grpc.RpcError) as info:
                s.stub.Act(pb.ActRequest(session_id=forged, input=feature_tensor(s, q)), timeout=T)
            assert info.value.code() == PRECONDITION
            assert f"unknown session {forged}; call Hello first" in info.value.details()
    finally:
        stop(s)


def test_another_bundles_session_is_refused_and_replicas_share_ids() -> None:
    from server.sessions import Sessions, bundle_key

    a, b = Sessions(bundle_key("p", "1", "d")), Sessions(bundle_key("p", "1", "d"))
    raw, split = a.open(raw=True), a.open(raw=False)
    assert b.get(raw.id).raw and not b.get(split.id).raw  # a replica of the same bundle
    other = Sessions(bundle_key("p", "2", "d"))  # the next version, after a rolling upgrade
    refused = 0
    for _ in range(20):
        try:
            other.get(a.open(raw=False).id)
        except Exception as e:
            refused += "call Hello first" in str(e)
    assert refused >= 19  # a 14-bit tag: a foreign id passes by chance 1 time in 16384
