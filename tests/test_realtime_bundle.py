"""Latency hiding end to end (issue 17 part 2): a tiny delay-aware and a tiny chunk policy are
trained (a few hundred steps), exported and served; the server's answers equal the bundle's
head.onnx / full.onnx run directly with onnxruntime, and bad actions in flight are refused
as INVALID_ARGUMENT and counted like any other invalid request."""

from __future__ import annotations

import math
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import onnxruntime as ort
import pytest

from edge.client import ClientConfig, PolicyClient
from edge.realtime import run_realtime
from edge.wire import from_tensor, to_tensor
from protos import policy_pb2 as pb
from splitedge.bundle import load_bundle
from splitedge.cli import main
from splitedge.errors import SplitedgeError
from tests.test_server import Served, T, feature_tensor, frame_tensor, session, start, stop

# 20 Hz (pixel Pendulum's dt 0.05 s); one-way 55 +- 10 ms and 10 ms off the link (the
# default): the longest is 140 ms = 2.8 ticks -> 3 (by hand), so the history is 3 and a
# chunk must be >= 4
LINK = """
[rt-test]
up_kbit = 2000
down_kbit = 2000
delay_ms = 55
jitter_ms = 10
queue_bytes = 65536
"""
HISTORY, CHUNK = 3, 4
TINY = {"learning_starts": 64, "buffer_size": 1000, "batch_size": 32}


def _train_and_export(root: Path, name: str, links: Path, **flags: Any) -> Path:
    from models.export import export_policy
    from models.train import TrainConfig, train

    cfg = TrainConfig(
        task="pendulum-pixels", algo="sac", timesteps=160, hyper=TINY, eval_episodes=1,
        random_episodes=1, links_file=str(links), **flags,
    )  # fmt: skip
    train(cfg, root / name, progress=False)
    export_policy(root / name / "model.zip", root / f"{name}-bundle", name, "0.0.1")
    return root / f"{name}-bundle"


@pytest.fixture(scope="module")
def links(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("links") / "links.toml"
    path.write_text(LINK)
    return path


@pytest.fixture(scope="module")
def delay_bundle(tmp_path_factory: pytest.TempPathFactory, links: Path) -> Path:
    return _train_and_export(tmp_path_factory.mktemp("rt"), "delay", links, delay_profile="rt-test")


@pytest.fixture(scope="module")
def chunk_bundle(tmp_path_factory: pytest.TempPathFactory, links: Path) -> Path:
    root = tmp_path_factory.mktemp("rt")
    return _train_and_export(root, "chunk", links, delay_profile="rt-test", chunk=CHUNK)


@pytest.fixture(scope="module")
def delay_served(delay_bundle: Path) -> Iterator[Served]:
    s = start(delay_bundle)
    yield s
    stop(s)


@pytest.fixture(scope="module")
def chunk_served(chunk_bundle: Path) -> Iterator[Served]:
    s = start(chunk_bundle)
    yield s
    stop(s)


def _onnx(bundle: Path, model: str, **inputs: np.ndarray) -> np.ndarray:
    sess = ort.InferenceSession(str(bundle / model), providers=["CPUExecutionProvider"])
    return np.asarray(sess.run(None, inputs)[0])


def _features(s: Served, n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, *s.out["shape"]), dtype=np.uint8)


def _histories(n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).uniform(-2, 2, (n, HISTORY, 1)).astype(np.float32)


def test_manifests_say_the_strategy(delay_bundle: Path, chunk_bundle: Path) -> None:
    delay = load_bundle(delay_bundle).policy["realtime"]
    assert (delay["strategy"], delay["chunk_length"], delay["action_history"]) == (
        "delay-aware", 1, HISTORY,
    )  # fmt: skip
    # the server keeps its history (format /2); a chunk bundle stays format /1
    assert (delay["format"], delay["history_source"]) == ("splitedge-realtime/2", "server")
    assert load_bundle(chunk_bundle).policy["realtime"]["format"] == "splitedge-realtime/1"
    assert math.isclose(delay["control_hz"], 20.0)
    chunk = load_bundle(chunk_bundle).policy
    assert (chunk["realtime"]["chunk_length"], chunk["realtime"]["action_history"]) == (CHUNK, 0)
    assert chunk["action"]["shape"] == [1]  # one tick's action, not the flattened chunk
    # measure's link check counts the history in a request: 3 float32 actions more
    from deploy.measure_checks import split_message_bytes

    features = load_bundle(delay_bundle).policy["encoder"]["output"]["shape"][0]  # uint8
    assert split_message_bytes(delay_bundle) == features + HISTORY * 4


def test_server_answers_the_head_with_the_actions_in_flight(delay_served: Served) -> None:
    feats, hist = _features(delay_served, 12), _histories(12)
    want = _onnx(delay_served.bundle, "head.onnx", features=feats, actions_in_flight=hist)
    sid = session(delay_served)
    requests = [
        pb.ActRequest(session_id=sid, step=i, input=feature_tensor(delay_served, f),
                      actions_in_flight=to_tensor(h))
        for i, (f, h) in enumerate(zip(feats, hist, strict=True))
    ]  # fmt: skip
    replies = list(delay_served.stub.ActStream(iter(requests), timeout=T))
    got = np.stack([from_tensor(r.action) for r in replies])
    assert np.allclose(got, want, atol=1e-6) and not any(r.HasField("chunk") for r in replies)
    # the history matters: another one gives other actions for the same features
    other = _onnx(delay_served.bundle, "head.onnx", features=feats, actions_in_flight=-hist)
    assert not np.allclose(other, want)


def test_raw_mode_feeds_the_history_to_full_onnx(delay_served: Served) -> None:
    frames = np.random.default_rng(3).integers(0, 256, (4, *delay_served.obs_shape), np.uint8)
    hist = _histories(4, seed=3)
    want = _onnx(delay_served.bundle, "full.onnx", observation=frames, actions_in_flight=hist)
    sid = session(delay_served, raw=True)
    got = [
        from_tensor(
            delay_served.stub.Act(
                pb.ActRequest(session_id=sid, step=i, input=frame_tensor(f),
                              actions_in_flight=to_tensor(h)), timeout=T,
            ).action
        )
        for i, (f, h) in enumerate(zip(frames, hist, strict=True))
    ]  # fmt: skip
    assert np.allclose(np.stack(got), want, atol=1e-6)


def test_server_answers_a_chunk(chunk_served: Served) -> None:
    feats = _features(chunk_served, 8, seed=1)
    want = _onnx(chunk_served.bundle, "head.onnx", features=feats)  # (B, H, 1)
    assert want.shape == (8, CHUNK, 1)
    sid = session(chunk_served)
    for i, f in enumerate(feats):
        reply = chunk_served.stub.Act(
            pb.ActRequest(session_id=sid, step=i, input=feature_tensor(chunk_served, f)), timeout=T
        )
        chunk = from_tensor(reply.chunk)
        assert list(reply.chunk.shape) == [CHUNK, 1] and np.allclose(chunk, want[i], atol=1e-6)
        assert np.allclose(from_tensor(reply.action), want[i][0], atol=1e-6)


def _refused(s: Served, history: pb.Tensor | None) -> grpc.RpcError:
    sid = session(s)
    request = pb.ActRequest(session_id=sid, step=1, input=feature_tensor(s, _features(s, 1)[0]))
    if history is not None:
        request.actions_in_flight.CopyFrom(history)
    with pytest.raises(grpc.RpcError) as e:
        s.stub.Act(request, timeout=T)
    return e.value


@pytest.mark.parametrize(
    ("history", "message"),
    [
        (None, "keeps the last 3 actions per stream: use ActStream with tick"),
        (to_tensor(np.zeros((2, 1), np.float32)), r"shape \[2, 1\] != expected \[3, 1\]"),
        (to_tensor(np.zeros((4, 1), np.float32)), r"shape \[4, 1\] != expected \[3, 1\]"),
        (to_tensor(np.zeros((3, 1), np.int64)), "must be float32"),
        (to_tensor(np.full((3, 1), np.nan, np.float32)), "NaN or Inf"),
        (pb.Tensor(shape=[3, 1], dtype=pb.FLOAT32, data=b"\0" * 8), "is 8 bytes"),
    ],
)
def test_bad_histories_are_invalid_argument(
    delay_served: Served, history: pb.Tensor | None, message: str
) -> None:
    before = delay_served.servicer.stats()["errors"].get("INVALID_ARGUMENT", 0)
    error = _refused(delay_served, history)
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert re.search(message, error.details()), error.details()
    after = delay_served.servicer.stats()["errors"].get("INVALID_ARGUMENT", 0)
    assert after == before + 1


def test_a_history_for_a_head_that_reads_none_is_refused(chunk_served: Served) -> None:
    error = _refused(chunk_served, to_tensor(np.zeros((3, 1), np.float32)))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "reads no actions in flight" in error.details()


def test_device_client_and_loop(delay_served: Served, chunk_served: Served) -> None:
    from edge.envs import make_env

    # act(): the head is told the default action (0) for the ticks before the episode
    bundle = load_bundle(delay_served.bundle)
    client = PolicyClient(
        bundle, ClientConfig(server=f"127.0.0.1:{delay_served.port}", backend="ort")
    )
    frame = np.random.default_rng(5).integers(0, 256, delay_served.obs_shape, np.uint8)
    with client.connect():
        got = client.act(frame)
        assert client.last is not None and not client.last.fallback, client.last.error
    feats = _onnx(delay_served.bundle, "encoder.onnx", observation=frame[None])
    want = _onnx(delay_served.bundle, "head.onnx", features=feats,
                 actions_in_flight=np.zeros((1, HISTORY, 1), np.float32))  # fmt: skip
    assert np.allclose(got, want[0], atol=1e-6)
    # the real-time loop on a chunk bundle plays chunks and says so (no timing asserted)
    bundle = load_bundle(chunk_served.bundle)
    client = PolicyClient(
        bundle, ClientConfig(server=f"127.0.0.1:{chunk_served.port}", backend="ort")
    )
    with client.connect():
        result = run_realtime(client, make_env("pendulum-pixels"), 0.02, 10, drain_s=5.0)
    assert result.strategy == "chunk 4" and len(result.records) == 10 - result.unsent


def test_delay_eval_plays_each_strategy(
    delay_bundle: Path, chunk_bundle: Path, links: Path
) -> None:
    from models.delay_eval import evaluate_bundle

    for bundle, strategy in ((delay_bundle, f"delay-aware (history {HISTORY}, server-kept)"),
                             (chunk_bundle, f"chunk {CHUNK}")):  # fmt: skip
        result = evaluate_bundle(bundle, "rt-test", links, episodes=1)
        assert result["strategy"] == strategy and result["delay_ticks_max"] == HISTORY
        assert len(result["returns"]) == 1 and math.isfinite(result["mean_return"])


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (
            ["--chunk", "3", "--delay-profile", "rt-test"],
            "--chunk 3 is not longer than link rt-test's",
        ),
        (
            ["--chunk", "2", "--task", "cartpole-pixels", "--algo", "ppo"],
            "needs continuous actions",
        ),
        (["--delay-profile", "nowhere"], "unknown link profile 'nowhere'"),
        (["--chunk", "0"], "--chunk must be >= 1"),
        (["--control-hz", "10"], "need --delay-profile or --chunk"),
        (["--delay-profile", "rt-test", "--encoder", "naturecnn"], "are for split encoders"),
    ],
)
def test_flag_combinations_are_one_line(
    links: Path, flags: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    base = ["train", "--task", "pendulum-pixels", "--algo", "sac", "--links-file", str(links)]
    assert main([*base, *flags]) != 0
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and message in err, err


def _kept_request(s: Served, sid: int, f: np.ndarray, tick: int, episode: int) -> pb.ActRequest:
    return pb.ActRequest(
        session_id=sid, step=tick, input=feature_tensor(s, f), tick=tick, episode=episode
    )


def test_server_keeps_each_streams_history(delay_served: Served) -> None:
    """No actions_in_flight, only ticks: each reply is head.onnx on the features and the
    server's own answers for the 3 ticks before (0 before the episode; a tick never sent
    holds the answer before it; a new episode starts afresh), computed here by hand."""
    feats = _features(delay_served, 12, seed=7)
    plan = [(7, t) for t in (1, 2, 3, 4, 6, 7, 8)] + [(8, t) for t in (1, 2, 3, 4, 5)]
    sid = session(delay_served)
    requests = [
        _kept_request(delay_served, sid, f, t, e) for f, (e, t) in zip(feats, plan, strict=True)
    ]
    replies = list(delay_served.stub.ActStream(iter(requests), timeout=T))
    answers: dict[tuple[int, int], float] = {}
    for f, (e, t), reply in zip(feats, plan, replies, strict=True):
        window = []
        for j in range(t - HISTORY, t):
            before = [a for (ee, tt), a in sorted(answers.items()) if ee == e and tt <= j]
            window.append(before[-1] if j >= 1 and before else 0.0)
        hist = np.asarray(window, np.float32).reshape(1, HISTORY, 1)
        want = _onnx(delay_served.bundle, "head.onnx", features=f[None], actions_in_flight=hist)
        got = from_tensor(reply.action)
        assert np.allclose(got, want[0], atol=1e-6), (e, t, window)
        answers[(e, t)] = float(np.asarray(got).reshape(-1)[0])
    # a second stream starts with an empty record: its tick 4 of episode 7 reads zeros
    again = list(delay_served.stub.ActStream(iter([requests[3]]), timeout=T))
    zeros = _onnx(delay_served.bundle, "head.onnx", features=feats[3][None],
                  actions_in_flight=np.zeros((1, HISTORY, 1), np.float32))  # fmt: skip
    assert np.allclose(from_tensor(again[0].action), zeros[0], atol=1e-6)


def test_a_kept_history_needs_a_stream_and_a_tick(delay_served: Served) -> None:
    sid = session(delay_served)
    f = _features(delay_served, 1)[0]
    with pytest.raises(grpc.RpcError) as unary:  # one call has no stream to keep it on
        delay_served.stub.Act(_kept_request(delay_served, sid, f, 3, 1), timeout=T)
    assert unary.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "use ActStream with tick and episode" in unary.value.details()
    no_tick = pb.ActRequest(session_id=sid, step=1, input=feature_tensor(delay_served, f))
    with pytest.raises(grpc.RpcError) as stream:
        list(delay_served.stub.ActStream(iter([no_tick]), timeout=T))
    assert stream.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "give each request its tick in the episode" in stream.value.details()


def test_the_real_time_loop_sends_ticks_for_a_kept_history(delay_served: Served) -> None:
    from edge.envs import make_env

    client = PolicyClient(
        load_bundle(delay_served.bundle),
        ClientConfig(server=f"127.0.0.1:{delay_served.port}", backend="ort"),
    )
    with client.connect():
        with pytest.raises(SplitedgeError, match="needs the observation's tick"):
            client.send(np.zeros(delay_served.obs_shape, np.uint8))
        result = run_realtime(client, make_env("pendulum-pixels"), 0.02, 12, drain_s=5.0)
    assert result.strategy == f"delay-aware (history {HISTORY}, server-kept)"
    assert len(result.records) == 12 - result.unsent and not any(r.fallback for r in result.records)
