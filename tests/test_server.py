"""The policy server, happy paths: Hello checks, actions equal to running the bundle's ONNX directly,
raw frames (none/PNG/JPEG), health, reflection, counters."""

from __future__ import annotations

import io
import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import onnxruntime as ort
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from PIL import Image

from protos import policy_pb2 as pb
from protos import policy_pb2_grpc as pb_grpc
from server.app import PolicyServer, create_server
from server.config import ServerConfig
from server.servicer import PolicyServicer
from tests.conftest import ZOO_BUNDLE

T = 10.0  # every client call's deadline, seconds


@dataclass
class Served:
    """A running in-process server, its servicer, a channel to it and the bundle's facts."""

    servicer: PolicyServicer
    server: PolicyServer
    port: int
    channel: grpc.Channel
    stub: pb_grpc.PolicyStub
    manifest: dict[str, Any]
    bundle: Path

    @property
    def out(self) -> dict[str, Any]:
        return dict(self.manifest["policy"]["encoder"]["output"])

    @property
    def obs_shape(self) -> list[int]:
        return list(self.manifest["policy"]["observation"]["shape"])


def start(bundle: Path, **cfg: Any) -> Served:
    """Start a server for the bundle on a free port (caller stops it with `stop`)."""
    config = ServerConfig(bundle=bundle, **cfg)
    servicer = PolicyServicer.from_config(config)
    server, port = create_server(config, servicer)
    server.start()
    channel = grpc.insecure_channel(f"127.0.0.1:{port}")
    manifest = json.loads((bundle / "manifest.json").read_text())
    return Served(servicer, server, port, channel, pb_grpc.PolicyStub(channel), manifest, bundle)


def stop(s: Served) -> None:
    s.channel.close()
    s.server.stop(0).wait()
    s.server.close()
    s.servicer.close()


@pytest.fixture(scope="module")
def served(tiny_bundle: Path) -> Iterator[Served]:
    s = start(tiny_bundle)
    yield s
    stop(s)


@pytest.fixture(scope="module")
def zoo_served() -> Iterator[Served]:
    """The shipped, fully trained bundle: the tiny one's full.onnx answers 0 to every frame,
    which would make raw-frame comparisons vacuous."""
    s = start(ZOO_BUNDLE)
    yield s
    stop(s)


def hello_request(s: Served, raw: bool = False, **changes: Any) -> pb.HelloRequest:
    """The Hello a correct client of this bundle sends, with fields overridden by `changes`."""
    m, out = s.manifest, s.out
    fields: dict[str, Any] = dict(
        bundle_name=m["name"],
        bundle_version=m["version"],
        mode=pb.MODE_RAW if raw else pb.MODE_SPLIT,
        encoder_digest=m["policy"]["encoder"]["digest"],
        feature_spec=pb.TensorSpec(
            shape=out["shape"], dtype=pb.UINT8, scale=out["scale"], zero_point=out["zero_point"]
        ),
    )
    fields.update(changes)
    return pb.HelloRequest(**fields)


def session(s: Served, raw: bool = False) -> int:
    return int(s.stub.Hello(hello_request(s, raw), timeout=T).session_id)


def feature_tensor(s: Served, q: np.ndarray) -> pb.Tensor:
    """uint8 features (F,) as a correct client sends them."""
    return pb.Tensor(
        shape=list(q.shape),
        dtype=pb.UINT8,
        data=q.astype(np.uint8).tobytes(),
        scale=s.out["scale"],
        zero_point=s.out["zero_point"],
    )


def frame_tensor(frame: np.ndarray, codec: str = "none") -> pb.Tensor:
    """A (C, H, W) uint8 frame: raw bytes, or a PNG/JPEG with the C planes as colour channels."""
    if codec == "none":
        return pb.Tensor(shape=list(frame.shape), dtype=pb.UINT8, data=frame.tobytes())
    buf = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(frame.transpose(1, 2, 0))).save(buf, format=codec.upper())
    return pb.Tensor(
        shape=list(frame.shape),
        dtype=pb.UINT8,
        data=buf.getvalue(),
        codec=pb.CODEC_PNG if codec == "png" else pb.CODEC_JPEG,
    )


def reference(bundle: Path, model: str, batch: np.ndarray) -> np.ndarray:
    """Actions from the bundle's ONNX run directly by onnxruntime, one sample at a time."""
    sess = ort.InferenceSession(str(bundle / model), providers=["CPUExecutionProvider"])
    name = sess.get_inputs()[0].name
    return np.array([sess.run(None, {name: x[None]})[0][0] for x in batch])


def action_of(reply: pb.ActReply) -> int:
    t = reply.action
    assert list(t.shape) == [1] and t.dtype == pb.INT64 and len(t.data) == 8
    return int(np.frombuffer(t.data, "<i8")[0])


def random_features(s: Served, n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, *s.out["shape"]), dtype=np.uint8)


def env_frames(n: int, seed: int = 0) -> np.ndarray:
    """(n, C, H, W) uint8 observations of the pixel task under random actions."""
    from edge.envs import make_env

    env, rng = make_env("cartpole-pixels", seed=seed), np.random.default_rng(seed)
    obs, _ = env.reset(seed=seed)
    frames = []
    for _ in range(n):
        frames.append(obs)
        obs, _, terminated, truncated, _ = env.step(int(rng.integers(2)))
        if terminated or truncated:
            obs, _ = env.reset()
    return np.stack(frames)


# -- Hello ----------------------------------------------------------------------------------
def test_hello_returns_the_bundle_and_its_specs(served: Served) -> None:
    r = served.stub.Hello(hello_request(served), timeout=T)
    m, out = served.manifest, served.out
    assert 0 < r.session_id < 2**35  # a varint of at most 5 bytes
    assert (r.bundle_name, r.bundle_version) == (m["name"], m["version"])
    assert r.encoder_digest == m["policy"]["encoder"]["digest"]
    assert list(r.feature_spec.shape) == out["shape"] and r.feature_spec.dtype == pb.UINT8
    assert r.feature_spec.scale == pytest.approx(out["scale"], rel=1e-6)
    assert r.feature_spec.zero_point == out["zero_point"]
    assert (
        list(r.observation_spec.shape) == served.obs_shape and r.observation_spec.dtype == pb.UINT8
    )
    assert list(r.action_spec.shape) == [1] and r.action_spec.dtype == pb.INT64
    assert served.stub.Hello(hello_request(served), timeout=T).session_id != r.session_id


def _refused(call: Any, request: Any) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as info:
        call(request, timeout=T)
    return info.value


def test_hello_with_another_encoder_is_refused_naming_both_sides(served: Served) -> None:
    theirs = "ab12cd34ef56" + "0" * 52
    e = _refused(
        served.stub.Hello,
        hello_request(served, encoder_digest=theirs, bundle_name="other", bundle_version="9.9.9"),
    )
    ours = served.manifest["policy"]["encoder"]["digest"]
    assert e.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "encoder digest mismatch" in e.details()
    assert "ab12cd34ef56" in e.details() and ours[:12] in e.details()
    assert (
        "other 9.9.9" in e.details()
        and f"{served.manifest['name']} {served.manifest['version']}" in e.details()
    )


@pytest.mark.parametrize("change", ["shape", "scale", "zero_point", "dtype", "missing"])
def test_hello_with_another_feature_spec_is_refused_naming_both_sides(
    served: Served, change: str
) -> None:
    out = served.out
    spec = {
        "shape": out["shape"],
        "dtype": pb.UINT8,
        "scale": out["scale"],
        "zero_point": out["zero_point"],
    }
    spec.update(
        {
            "shape": {"shape": [out["shape"][0] + 4]},
            "scale": {"scale": out["scale"] * 2},
            "zero_point": {"zero_point": 3},
            "dtype": {"dtype": pb.INT32},
            "missing": {"shape": [], "dtype": 0, "scale": 0.0, "zero_point": 0},
        }[change]
    )
    e = _refused(served.stub.Hello, hello_request(served, feature_spec=pb.TensorSpec(**spec)))
    assert e.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "feature spec mismatch" in e.details()
    assert f"server uint8{out['shape']}" in e.details() and "client " in e.details()


def test_raw_hello_skips_the_encoder_check(served: Served) -> None:
    r = served.stub.Hello(
        hello_request(served, raw=True, encoder_digest="", feature_spec=None), timeout=T
    )
    assert r.session_id > 0


# -- acting ---------------------------------------------------------------------------------
def test_split_unary_and_stream_match_head_onnx(served: Served) -> None:
    feats = random_features(served, 40)
    want = reference(served.bundle, "head.onnx", feats)
    sid = session(served)
    unary = [
        action_of(
            served.stub.Act(
                pb.ActRequest(session_id=sid, step=i, input=feature_tensor(served, f)), timeout=T
            )
        )
        for i, f in enumerate(feats)
    ]
    requests = [
        pb.ActRequest(session_id=sid, step=100 + i, input=feature_tensor(served, f))
        for i, f in enumerate(feats)
    ]
    replies = list(served.stub.ActStream(iter(requests), timeout=T))
    assert [r.step for r in replies] == [100 + i for i in range(len(feats))]
    assert unary == want.tolist() and [action_of(r) for r in replies] == want.tolist()


def test_float32_features_are_quantised_by_the_server(served: Served) -> None:
    feats = random_features(served, 20, seed=1)
    want = reference(served.bundle, "head.onnx", feats)
    scale, zp = served.out["scale"], served.out["zero_point"]
    sid = session(served)
    got = []
    for q in feats:
        x = ((q.astype(np.float64) - zp) * scale).astype(np.float32)  # what a float client sends
        t = pb.Tensor(shape=list(x.shape), dtype=pb.FLOAT32, data=x.astype("<f4").tobytes())
        got.append(action_of(served.stub.Act(pb.ActRequest(session_id=sid, input=t), timeout=T)))
    assert got == want.tolist()


@pytest.mark.parametrize("codec", ["none", "png"])
def test_raw_lossless_frames_match_full_onnx(zoo_served: Served, codec: str) -> None:
    s, frames = zoo_served, env_frames(40, seed=2)
    want = reference(s.bundle, "full.onnx", frames)
    assert set(want.tolist()) == {0, 1}  # both actions occur, so equality means something
    sid = session(s, raw=True)
    requests = [
        pb.ActRequest(session_id=sid, step=i, input=frame_tensor(f, codec))
        for i, f in enumerate(frames)
    ]
    assert [action_of(r) for r in s.stub.ActStream(iter(requests), timeout=T)] == want.tolist()


def test_raw_jpeg_frames_match_full_onnx_on_pillows_decode(zoo_served: Served) -> None:
    s, frames = zoo_served, env_frames(40, seed=3)
    tensors = [frame_tensor(f, "jpeg") for f in frames]
    decoded = np.stack(
        [np.asarray(Image.open(io.BytesIO(t.data))).transpose(2, 0, 1) for t in tensors]
    )
    assert not np.array_equal(decoded, frames)  # lossy: the reference must use the decoded frames
    want = reference(s.bundle, "full.onnx", decoded)
    assert set(want.tolist()) == {0, 1}
    sid = session(s, raw=True)
    got = [
        action_of(s.stub.Act(pb.ActRequest(session_id=sid, input=t), timeout=T)) for t in tensors
    ]
    assert got == want.tolist()


def test_reply_carries_step_and_server_times(served: Served) -> None:
    sid = session(served)
    r = served.stub.Act(
        pb.ActRequest(
            session_id=sid, step=2**40, input=feature_tensor(served, random_features(served, 1)[0])
        ),
        timeout=T,
    )
    assert r.step == 2**40
    assert r.compute_us > 0  # an onnxruntime call takes at least a microsecond
    assert r.queue_us < 10_000_000


def test_stats_count_decisions_errors_and_cpu(served: Served) -> None:
    before = served.servicer.stats()
    sid = session(served)
    for q in random_features(served, 5, seed=4):
        served.stub.Act(pb.ActRequest(session_id=sid, input=feature_tensor(served, q)), timeout=T)
    _refused(
        served.stub.Act,
        pb.ActRequest(session_id=sid, input=pb.Tensor(shape=[1], dtype=pb.UINT8, data=b"x")),
    )
    after = served.servicer.stats()
    assert after["decisions"] - before["decisions"] == 5
    assert (
        after["errors"].get("INVALID_ARGUMENT", 0) - before["errors"].get("INVALID_ARGUMENT", 0)
        == 1
    )
    assert after["cpu_s"] > before["cpu_s"] >= 0
    assert after["cpu_s_per_decision"] == pytest.approx(after["cpu_s"] / after["decisions"])
    assert after["head_batches"]["samples"] >= 5


# -- health and reflection ------------------------------------------------------------------
def test_health_says_serving(served: Served) -> None:
    stub = health_pb2_grpc.HealthStub(served.channel)
    for name in ("", "splitedge.v1.Policy"):
        r = stub.Check(health_pb2.HealthCheckRequest(service=name), timeout=T)
        assert r.status == health_pb2.HealthCheckResponse.SERVING


def test_reflection_lists_the_policy_service(served: Served) -> None:
    stub = reflection_pb2_grpc.ServerReflectionStub(served.channel)
    replies = list(
        stub.ServerReflectionInfo(
            iter([reflection_pb2.ServerReflectionRequest(list_services="")]), timeout=T
        )
    )
    names = {s.name for s in replies[0].list_services_response.service}
    assert {"splitedge.v1.Policy", "grpc.health.v1.Health"} <= names


def test_concurrent_clients_are_batched_and_each_gets_its_own_action(tiny_bundle: Path) -> None:
    import threading

    # a long delay with max_batch = clients: the batcher waits until all of them are in (half
    # the call deadline T, so a loaded machine starting the six threads slowly cannot split it)
    s = start(tiny_bundle, max_batch=6, max_delay_ms=T * 1000 / 2)
    try:
        feats = random_features(s, 6, seed=7)
        want = reference(s.bundle, "head.onnx", feats).tolist()
        sids = [session(s) for _ in feats]
        got: dict[int, int] = {}

        def one(i: int) -> None:
            r = s.stub.Act(
                pb.ActRequest(session_id=sids[i], step=i, input=feature_tensor(s, feats[i])),
                timeout=T,
            )
            got[i] = action_of(r)

        threads = [threading.Thread(target=one, args=(i,)) for i in range(len(feats))]
        for th in threads:
            th.start()
        for th in threads:
            th.join(T)
        assert [got[i] for i in range(len(feats))] == want
        assert s.servicer.head.batch_sizes == {6: 1}  # one model call answered all six
    finally:
        stop(s)


def test_plain_functions_work_without_grpc(served: Served) -> None:
    """hello() and decide() are the servicer's core; the RPC methods only translate."""
    sid = served.servicer.hello(hello_request(served)).session_id
    feats = random_features(served, 3, seed=11)
    want = reference(served.bundle, "head.onnx", feats).tolist()
    got = [
        action_of(
            served.servicer.decide(pb.ActRequest(session_id=sid, input=feature_tensor(served, q)))
        )
        for q in feats
    ]
    assert got == want


@pytest.mark.parametrize("channels", [1, 2, 3, 4, 5])
def test_png_frames_of_any_channel_count_round_trip_exactly(channels: int) -> None:
    """edge.wire's encoder and the server's decoder agree on every channel count: image
    modes for 1/3/4 planes, stacked grey planes otherwise (2 = Pendulum's frame pair)."""
    from edge.wire import encode_frame, stacks_planes
    from server.models import Spec
    from server.validation import decode_frame

    rng = np.random.default_rng(channels)
    frame = rng.integers(0, 256, (channels, 24, 20), dtype=np.uint8)
    spec = Spec(shape=(channels, 24, 20), dtype="uint8")
    t = encode_frame(frame, "png")
    assert list(t.shape) == [channels, 24, 20]
    np.testing.assert_array_equal(decode_frame(t.data, "PNG", spec), frame)
    assert stacks_planes(channels, "png") == (channels in (2, 5))
    if channels != 1:  # jpeg: lossy, but the planes must land in the right place
        ramp = np.linspace(0, 120, 20)[None, None, :] + 25 * np.arange(channels)[:, None, None]
        frame = np.ascontiguousarray(np.broadcast_to(ramp, (channels, 24, 20)).astype(np.uint8))
        got = decode_frame(encode_frame(frame, "jpeg").data, "JPEG", spec)
        assert got.shape == frame.shape
        assert np.abs(got.astype(int) - frame).mean() < 8
