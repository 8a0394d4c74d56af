"""Float32-feature bundles (models trained without quantisation) end to end: server, wire, edge.

The bundle is tests/float_bundle.py's float copy of the zoo bundle; every expected action
comes from its encoder.onnx and head.onnx run directly with onnxruntime.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np
import onnxruntime as ort
import pytest

from edge.client import connect
from edge.wire import features_tensor
from protos import policy_pb2 as pb
from server.models import PolicyModels
from server.validation import features_sample
from splitedge.bundle import load_bundle
from splitedge.errors import SplitedgeError
from tests.conftest import ZOO_BUNDLE
from tests.float_bundle import build_float_bundle
from tests.test_server import Served, T, action_of, env_frames, hello_request, start, stop


def _session(path: Path, name: str) -> ort.InferenceSession:
    return ort.InferenceSession(str(path / name), providers=["CPUExecutionProvider"])


def _run(sess: ort.InferenceSession, x: np.ndarray) -> np.ndarray:
    return np.asarray(sess.run(None, {sess.get_inputs()[0].name: x})[0])


@pytest.fixture(scope="module")
def float_bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_float_bundle(tmp_path_factory.mktemp("float") / "cartpole-float")


@pytest.fixture(scope="module")
def float_served(float_bundle: Path) -> Iterator[Served]:
    s = start(float_bundle)
    yield s
    stop(s)


@pytest.fixture(scope="module")
def frames() -> np.ndarray:
    return env_frames(24, seed=3)


def expected_actions(bundle: Path, frames: np.ndarray) -> list[int]:
    """head(encoder(obs)) with the bundle's own ONNX files, one frame at a time."""
    enc, head = _session(bundle, "encoder.onnx"), _session(bundle, "head.onnx")
    return [int(_run(head, _run(enc, f[None]))[0]) for f in frames]


# -- the fixture is what it claims ------------------------------------------------------------
def test_float_bundle_is_the_zoo_policy_without_feature_quantisation(
    float_bundle: Path, frames: np.ndarray
) -> None:
    scale = load_bundle(ZOO_BUNDLE).policy["encoder"]["output"]["scale"]
    q = np.random.default_rng(0).integers(0, 256, (64, 64), dtype=np.uint8)
    zoo_head, float_head = _session(ZOO_BUNDLE, "head.onnx"), _session(float_bundle, "head.onnx")
    deq = q.astype(np.float32) * np.float32(scale)
    assert _run(float_head, deq).tolist() == _run(zoo_head, q).tolist()
    x = _run(_session(float_bundle, "encoder.onnx"), frames)  # (B, F) float32
    zoo_q = _run(_session(ZOO_BUNDLE, "encoder.onnx"), frames)
    assert x.dtype == np.float32 and x.shape == zoo_q.shape
    inside = x < 255 * scale  # below the zoo's clip, quantisation is the only difference
    err = np.abs(x - zoo_q.astype(np.float64) * scale)[inside]
    assert err.max() <= scale / 2 + 1e-5


# -- server ---------------------------------------------------------------------------------
def test_server_loads_a_float_bundle_and_its_head_reads_float32(float_bundle: Path) -> None:
    models = PolicyModels.load(float_bundle)
    assert models.features.dtype == "float32" and models.features.describe() == "float32[64]"
    x = np.linspace(0, 2, 64, dtype=np.float32)
    t = pb.Tensor(shape=[64], dtype=pb.FLOAT32, data=x.astype("<f4").tobytes())
    row = features_sample(t, models.features)
    assert row.dtype == np.float32 and np.array_equal(row, x)  # as they are, not quantised


def test_float_bundle_end_to_end_with_the_ort_encoder(
    float_served: Served, float_bundle: Path, frames: np.ndarray
) -> None:
    want = expected_actions(float_bundle, frames)
    assert len(set(want)) == 2, "frames where the policy picks both actions"
    for rpc in ("stream", "unary"):
        with connect(
            float_bundle, f"127.0.0.1:{float_served.port}", backend="ort", rpc=rpc, deadline_s=T
        ) as policy:
            got = [policy.act(f) for f in frames]
            assert policy.fallbacks == 0 and policy.last is not None
            # one float32 per feature goes up (plus framing), four times the uint8 payload
            assert policy.last.bytes_up > 4 * 64
        assert got == want


def test_hello_refuses_a_uint8_client_of_a_float_bundle_naming_both_sides(
    float_served: Served,
) -> None:
    with pytest.raises(grpc.RpcError) as info:
        float_served.stub.Hello(hello_request(float_served), timeout=T)  # a UINT8 feature spec
    e = info.value
    assert e.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "feature spec mismatch" in e.details()
    assert "client uint8[64] scale" in e.details() and "server float32[64]" in e.details()


def test_hello_refuses_a_float_client_of_a_uint8_bundle_naming_both_sides() -> None:
    s = start(ZOO_BUNDLE)
    try:
        out = s.out
        spec = pb.TensorSpec(shape=out["shape"], dtype=pb.FLOAT32, scale=out["scale"])
        with pytest.raises(grpc.RpcError) as info:
            s.stub.Hello(hello_request(s, feature_spec=spec), timeout=T)
    finally:
        stop(s)
    e = info.value
    assert e.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "client float32[64]" in e.details() and "server uint8[64] scale" in e.details()


def test_float_hello_ignores_the_informative_scale(float_served: Served) -> None:
    spec = pb.TensorSpec(shape=[64], dtype=pb.FLOAT32, scale=0.0)
    reply = float_served.stub.Hello(hello_request(float_served, feature_spec=spec), timeout=T)
    assert reply.session_id > 0 and reply.feature_spec.dtype == pb.FLOAT32


def test_edge_client_of_the_other_export_is_refused_in_one_line(float_served: Served) -> None:
    with pytest.raises(SplitedgeError, match="server refused the bundle: encoder digest"):
        connect(ZOO_BUNDLE, f"127.0.0.1:{float_served.port}", backend="ort", deadline_s=T)


@pytest.mark.parametrize(
    "dtype, data, words",
    [
        (pb.UINT8, bytes(64), "send FLOAT32 values"),
        (pb.FLOAT32, np.full(64, np.nan, "<f4").tobytes(), "NaN"),
        (pb.FLOAT32, bytes(64), "bytes"),
    ],
)
def test_bad_features_for_a_float_bundle_are_invalid_and_the_server_keeps_serving(
    float_served: Served, frames: np.ndarray, dtype: int, data: bytes, words: str
) -> None:
    sid = int(float_served.stub.Hello(_float_hello(float_served), timeout=T).session_id)
    t = pb.Tensor(shape=[64], dtype=dtype, data=data)
    with pytest.raises(grpc.RpcError) as info:
        float_served.stub.Act(pb.ActRequest(session_id=sid, input=t), timeout=T)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert words in info.value.details()
    x = _run(_session(float_served.bundle, "encoder.onnx"), frames[:1])[0]
    good = pb.Tensor(shape=[64], dtype=pb.FLOAT32, data=x.astype("<f4").tobytes())
    reply = float_served.stub.Act(pb.ActRequest(session_id=sid, input=good), timeout=T)
    assert action_of(reply) == expected_actions(float_served.bundle, frames[:1])[0]


def _float_hello(s: Served) -> pb.HelloRequest:
    return hello_request(s, feature_spec=pb.TensorSpec(shape=[64], dtype=pb.FLOAT32))


# -- edge -----------------------------------------------------------------------------------
def test_features_tensor_follows_the_bundle_dtype(float_bundle: Path) -> None:
    out = load_bundle(float_bundle).policy["encoder"]["output"]
    x = np.arange(64, dtype=np.float32) / 7
    t = features_tensor(x, out)
    assert (t.dtype, t.scale, t.zero_point) == (pb.FLOAT32, 0.0, 0)
    assert np.array_equal(np.frombuffer(t.data, "<f4"), x)
    with pytest.raises(
        SplitedgeError, match="returned uint8 features but the bundle's are float32"
    ):
        features_tensor(x.astype(np.uint8), out)
    zoo_out = load_bundle(ZOO_BUNDLE).policy["encoder"]["output"]
    q = features_tensor(np.arange(64, dtype=np.uint8), zoo_out)
    assert q.dtype == pb.UINT8 and q.scale == pytest.approx(zoo_out["scale"])


def test_ort_encoder_refuses_an_encoder_onnx_that_disagrees_with_the_manifest(
    float_bundle: Path, tmp_path: Path
) -> None:
    import json
    import shutil

    from edge.encoder import make_encoder
    from splitedge.bundle import write_manifest

    bad = tmp_path / "bad"
    shutil.copytree(float_bundle, bad)
    manifest = json.loads((bad / "manifest.json").read_text())
    manifest["policy"]["encoder"]["output"]["dtype"] = "uint8"
    write_manifest(bad, {k: v for k, v in manifest.items() if k not in ("format", "files")})
    with pytest.raises(SplitedgeError, match=r"outputs tensor\(float\) but the manifest says"):
        make_encoder(load_bundle(bad), "ort")


def test_probe_and_health_gate_compare_float_features_in_steps(
    float_served: Served, float_bundle: Path, tmp_path: Path
) -> None:
    from deploy.flash.package import stage_release
    from edge.health import health

    release = tmp_path / "release"
    info = stage_release(
        load_bundle(float_bundle),
        release,
        str(tmp_path),
        f"127.0.0.1:{float_served.port}",
        {"kind": "env"},
        {"kind": "log"},
        {"backend": "ort"},
    )
    scale = load_bundle(float_bundle).policy["encoder"]["output"]["scale"]
    assert info["probe"]["dtype"] == "float32" and info["probe"]["step"] == scale
    gate = health(release, None)
    assert gate["ok"], gate
    assert gate["encoder"]["max_diff_lsb"] == 0.0 and gate["round_trip"]["ok"]
    probe = dict(np.load(release / "probe.npz"))
    probe["features"] = probe["features"] + np.float32(3 * scale)  # three steps off everywhere
    np.savez(release / "probe.npz", **probe)
    gate = health(release, None)
    assert not gate["ok"] and "by up to 3.0 LSB (> 2)" in gate["error"]


def test_measure_counts_four_bytes_per_float_feature(float_bundle: Path) -> None:
    from deploy.measure_checks import split_message_bytes

    assert split_message_bytes(float_bundle) == 64 * 4
    assert split_message_bytes(ZOO_BUNDLE) == 64


def test_bench_server_messages_are_what_a_float_bundle_accepts(float_bundle: Path) -> None:
    from deploy.bench_server import _messages
    from server.servicer import check_split_hello

    models = PolicyModels.load(float_bundle)
    hello, tensor = _messages(load_bundle(float_bundle))["split"]
    check_split_hello(pb.HelloRequest.FromString(hello), models)  # raises if refused
    row = features_sample(pb.Tensor.FromString(tensor), models.features)
    assert row.dtype == np.float32 and row.shape == (64,)
