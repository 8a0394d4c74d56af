"""Exported bundles act exactly like SB3's predict(deterministic=True)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest

from edge.envs import make_env
from models.export import sb3_actions
from splitedge.bundle import load_bundle
from tests.conftest import ROOT, ZOO_BUNDLE


def _observations(task: str, n: int, seed: int = 7) -> np.ndarray:
    """n observations from random-action episodes (varied states, not just starts)."""
    env = make_env(task, seed=seed)
    obs, _ = env.reset(seed=seed)
    out = []
    for i in range(n):
        out.append(obs)
        obs, _, term, trunc, _ = env.step(env.action_space.sample())
        if term or trunc:
            obs, _ = env.reset(seed=seed + i)
    return np.stack(out)


def _split_and_full(bundle_dir: Path, obs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    enc = ort.InferenceSession(str(bundle_dir / "encoder.onnx"))
    head = ort.InferenceSession(str(bundle_dir / "head.onnx"))
    full = ort.InferenceSession(str(bundle_dir / "full.onnx"))
    feats = enc.run(None, {"observation": obs})[0]
    assert feats.dtype == np.uint8
    return head.run(None, {"features": feats})[0], full.run(None, {"observation": obs})[0]


def test_tiny_bundle_matches_sb3_predict(tiny_run: Path, tiny_bundle: Path) -> None:
    obs = _observations("cartpole-pixels", 256)
    ref = sb3_actions(tiny_run / "model.zip", obs)
    split, full = _split_and_full(tiny_bundle, obs)
    assert np.array_equal(split, ref)
    assert np.array_equal(full, ref)


def test_zoo_bundle_matches_its_sb3_model() -> None:
    obs = _observations("cartpole-pixels", 300, seed=3)
    ref = sb3_actions(ROOT / "models" / "zoo" / "cartpole-ppo.sb3.zip", obs)
    split, full = _split_and_full(ZOO_BUNDLE, obs)
    assert len(ref) >= 200
    assert np.array_equal(split, ref)
    assert np.array_equal(full, ref)


def test_manifest_records_training(tiny_bundle: Path) -> None:
    m = load_bundle(tiny_bundle).manifest
    p = m["policy"]
    assert p["observation"] == {"shape": [3, 48, 48], "dtype": "uint8", "layout": "CHW"}
    assert p["encoder"]["output"]["shape"] == [64]
    assert p["training"]["final_100_mean_return"] is not None
    assert set(m["files"]) == {
        "encoder.onnx",
        "head.onnx",
        "full.onnx",
        "encoder_ir.json",
        "encoder_weights.npz",
    }
    assert json.loads((tiny_bundle / "encoder_ir.json").read_text())["output"]["features"] == 64


# -- every algorithm: tiny runs of `splitedge train`'s own code -------------------------------


@pytest.fixture(scope="module")
def miniconv_runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """One tiny miniconv run per algorithm on its task (the configs test_train.py uses)."""
    from models.train import TrainConfig, train
    from tests.test_train import TASK_OF, TINY

    out = {}
    for algo, tiny in TINY.items():
        run = tmp_path_factory.mktemp(f"{algo}-miniconv")
        cfg = TrainConfig(task=TASK_OF[algo], algo=algo, eval_episodes=1, random_episodes=2, **tiny)
        train(cfg, run, progress=False)
        out[algo] = run
    return out


@pytest.fixture(scope="module")
def algo_bundles(
    miniconv_runs: dict[str, Path], tmp_path_factory: pytest.TempPathFactory
) -> dict[str, Path]:
    """Each run exported through the `splitedge export` command."""
    from splitedge.cli import main

    out = {}
    for algo, run in miniconv_runs.items():
        bundle = tmp_path_factory.mktemp("bundles") / f"tiny-{algo}"
        argv = ["export", "--model", str(run / "model.zip"), "--out", str(bundle)]
        assert main([*argv, "--version", "0.0.1"]) == 0
        out[algo] = bundle
    return out


@pytest.mark.parametrize("algo", ["ppo", "sac", "ddpg"])
def test_every_algorithm_exports_a_bundle_that_acts_like_sb3(
    miniconv_runs: dict[str, Path], algo_bundles: dict[str, Path], algo: str
) -> None:
    from splitedge.cli import main
    from tests.test_train import TASK_OF

    bundle = algo_bundles[algo]
    assert main(["bundle", "verify", str(bundle)]) == 0
    obs = _observations(TASK_OF[algo], 128)
    # SB3's predict sees the encoder's features on the uint8 grid too (MiniConv's FakeQuantU8
    # in eval mode), so the head's uint8 -> scale dequantisation reproduces them and the
    # continuous actions agree to float32 rounding, not just to a quantisation step.
    ref = sb3_actions(miniconv_runs[algo] / "model.zip", obs)
    split, full = _split_and_full(bundle, obs)
    manifest = load_bundle(bundle).manifest["policy"]
    assert manifest["algorithm"] == algo
    if algo == "ppo":
        assert manifest["action"]["type"] == "discrete"
        assert np.array_equal(split, ref) and np.array_equal(full, ref)
        return
    env = make_env(TASK_OF[algo])
    space = env.action_space
    assert manifest["action"] == {
        "type": "continuous",
        "shape": list(space.shape),
        "dtype": "float32",
        "low": space.low.tolist(),
        "high": space.high.tolist(),
    }
    assert split.dtype == full.dtype == np.float32
    assert split.shape == full.shape == ref.shape == (len(obs), *space.shape)
    np.testing.assert_allclose(split, ref, rtol=0, atol=1e-4)
    np.testing.assert_allclose(full, ref, rtol=0, atol=1e-4)


@pytest.mark.parametrize("algo", ["sac", "ddpg"])
def test_continuous_bundle_serves_float_actions_to_the_edge_client(
    algo_bundles: dict[str, Path], algo: str
) -> None:
    from edge.client import ClientConfig, PolicyClient
    from tests.test_server import start, stop
    from tests.test_train import TASK_OF

    bundle = algo_bundles[algo]
    action = load_bundle(bundle).manifest["policy"]["action"]
    low, high = np.asarray(action["low"], np.float32), np.asarray(action["high"], np.float32)
    obs = _observations(TASK_OF[algo], 8, seed=11)
    split, _ = _split_and_full(bundle, obs)  # the client's ort encoder is encoder.onnx
    served = start(bundle)
    try:
        for rpc in ("unary", "stream"):
            cfg = ClientConfig(server=f"127.0.0.1:{served.port}", backend="ort", rpc=rpc)
            with PolicyClient(load_bundle(bundle), cfg).connect() as client:
                for frame, expected in zip(obs, split, strict=True):
                    a = client.act(frame)
                    assert not client.last.fallback, client.last.error
                    assert isinstance(a, np.ndarray) and a.dtype == np.float32
                    assert a.shape == tuple(action["shape"])
                    assert np.all((low <= a) & (a <= high))
                    np.testing.assert_allclose(a, expected, rtol=0, atol=1e-6)
    finally:
        stop(served)


def test_continuous_client_falls_back_inside_the_action_bounds(
    algo_bundles: dict[str, Path],
) -> None:
    from edge.client import ClientConfig, PolicyClient

    bundle = load_bundle(algo_bundles["sac"])  # Pendulum torque in [-2, 2]
    cfg = ClientConfig(server="127.0.0.1:1", deadline_s=0.2, fallback="5")
    client = PolicyClient(bundle, cfg)
    a = client.act(_observations("pendulum-pixels", 1)[0])
    assert client.fallbacks == 1
    assert a.dtype == np.float32 and a.tolist() == [2.0]


def test_naturecnn_model_exports_with_its_env_and_acts_like_predict(tmp_path: Path) -> None:
    from models.train import TrainConfig, build_model
    from splitedge.cli import main

    # untrained is enough: the bundle must reproduce whatever the model does. No result.json
    # beside it, so the algorithm comes from the saved policy and the env from --env.
    cfg = TrainConfig(
        task="pendulum-pixels", algo="sac", encoder="naturecnn", hyper={"buffer_size": 100}
    )
    build_model(cfg).save(tmp_path / "model.zip")
    argv = ["export", "--model", str(tmp_path / "model.zip"), "--out", str(tmp_path / "b")]
    assert main([*argv, "--env", "pendulum-pixels"]) == 0
    policy = load_bundle(tmp_path / "b").manifest["policy"]
    assert policy["task"] is None and policy["env"] == {"id": "pendulum-pixels", "kwargs": {}}
    assert policy["agreement"]["ort"]["agree"] == 1.0
    obs = _observations("pendulum-pixels", 64, seed=5)
    ref = sb3_actions(tmp_path / "model.zip", obs)
    enc = ort.InferenceSession(str(tmp_path / "b" / "encoder.onnx"))
    head = ort.InferenceSession(str(tmp_path / "b" / "head.onnx"))
    split = head.run(None, {"features": enc.run(None, {"observation": obs})[0]})[0]
    np.testing.assert_allclose(split, ref, rtol=0, atol=1e-4)
