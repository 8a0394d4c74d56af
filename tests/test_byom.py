"""Bring your own model: a user's env (examples/byom, not one of our tasks) and SB3 models built
with SB3's own policy classes go through `splitedge export`, `bundle verify`, a real server
and the edge client on every encoder backend, and act like the model's predict.

The models are built, not trained: export must reproduce whatever a model does. An untrained
discrete policy's logits sit within ~1e-2 of each other (SB3 initialises the action net with
gain 0.01), so any 8-bit path would flip near-ties that a trained policy does not have;
scaling the action net by 100 stands in for training there.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import gymnasium as gym
import numpy as np
import pytest
import torch
from stable_baselines3.common.torch_layers import BaseFeaturesExtractor
from torch import nn

from splitedge.bundle import load_bundle
from tests.conftest import ROOT

USER_DIR = ROOT / "examples" / "byom"  # the user's project: dot_env.py lives there
ENV = "dot_env:DotTrack"
N_OBS = 200


class UserCNN(BaseFeaturesExtractor):
    """A user's extractor: strided 1x1 conv, odd channel counts, pools with stride != size and
    padding, then a Linear that stays on the server."""

    def __init__(self, observation_space: gym.spaces.Box, features_dim: int = 32):
        super().__init__(observation_space, features_dim)
        c = observation_space.shape[0]
        self.cnn = nn.Sequential(
            nn.Conv2d(c, 6, kernel_size=1, stride=2),
            nn.ReLU(),
            nn.Conv2d(6, 5, kernel_size=3),
            nn.ReLU(),
            nn.AvgPool2d(kernel_size=3, stride=2),
            nn.MaxPool2d(kernel_size=3, stride=1, padding=1),
            nn.Flatten(),
        )
        with torch.no_grad():
            n = self.cnn(torch.zeros(1, *observation_space.shape)).shape[1]
        self.linear = nn.Sequential(nn.Linear(n, features_dim), nn.ReLU())

    def forward(self, observations: torch.Tensor) -> torch.Tensor:
        return self.linear(self.cnn(observations))


@pytest.fixture(scope="module")
def user_env() -> Iterator[Any]:
    """The user's env module importable, as from their project folder."""
    sys.path.insert(0, str(USER_DIR))
    import dot_env

    yield dot_env
    sys.path.remove(str(USER_DIR))


def _decisive(model: Any) -> Any:
    with torch.no_grad():
        model.policy.action_net.weight.mul_(100.0)
    return model


def build(kind: str, dot_env: Any) -> Any:
    """An SB3 model of one kind on the user's env."""
    from stable_baselines3 import PPO, SAC

    from models.encoders import MiniConvExtractor

    env = dot_env.DotTrack()
    if kind == "sac-cnnpolicy":
        return SAC("CnnPolicy", dot_env.DotTrack(continuous=True), buffer_size=100, seed=0)
    kwargs: dict[str, Any] = {
        "ppo-miniconv": {"features_extractor_class": MiniConvExtractor},
        "ppo-cnnpolicy": {},
        "ppo-user-sequential": {"features_extractor_class": UserCNN},
        "ppo-unnormalised": {"normalize_images": False},
    }[kind]
    return _decisive(PPO("CnnPolicy", env, policy_kwargs=kwargs, n_steps=64, seed=0))


KINDS = [
    "ppo-miniconv",
    "ppo-cnnpolicy",
    "sac-cnnpolicy",
    "ppo-user-sequential",
    "ppo-unnormalised",
]


@pytest.fixture(scope="module")
def exported(
    user_env: Any, tmp_path_factory: pytest.TempPathFactory
) -> dict[str, tuple[Any, Path]]:
    """Each kind saved as a model.zip and exported by the CLI with --env (kwargs for SAC)."""
    from splitedge.cli import main

    out = {}
    for kind in KINDS:
        model = build(kind, user_env)
        run = tmp_path_factory.mktemp(kind)
        model.save(run / "model.zip")
        argv = ["export", "--model", str(run / "model.zip"), "--out", str(run / "bundle")]
        argv += ["--env", ENV, "--name", kind]
        if kind.startswith("sac"):
            argv += ["--env-kwargs", '{"continuous": true}']
        assert main(argv) == 0, kind
        out[kind] = (model, run / "bundle")
    return out


def observations(dot_env: Any, continuous: bool, n: int = N_OBS, seed: int = 21) -> np.ndarray:
    """n observations of the user's env under random actions (not the export's own sets)."""
    env = dot_env.DotTrack(continuous=continuous)
    env.action_space.seed(seed)
    obs, _ = env.reset(seed=seed)
    out = []
    for _ in range(n):
        out.append(obs)
        obs, _, term, trunc, _ = env.step(env.action_space.sample())
        if term or trunc:
            obs, _ = env.reset()
    return np.stack(out)


def _agreement(got: np.ndarray, want: np.ndarray, discrete: bool, tol: float) -> float:
    got, want = got.reshape(len(want), -1), want.reshape(len(want), -1)
    if discrete:
        return float(np.mean(np.all(got == want, axis=1)))
    return float(np.mean(np.abs(got - want).max(axis=1) <= tol))


def _act_all(bundle: Path, backend: str, obs: np.ndarray, port: int) -> np.ndarray:
    from edge.client import ClientConfig, PolicyClient

    cfg = ClientConfig(server=f"127.0.0.1:{port}", backend=backend, deadline_s=30.0)
    with PolicyClient(load_bundle(bundle), cfg).connect() as client:
        actions = []
        for frame in obs:
            actions.append(np.asarray(client.act(frame)))
            assert not client.last.fallback, client.last.error
    return np.stack(actions)


@pytest.mark.parametrize("kind", KINDS)
def test_user_model_is_exported_verified_served_and_acts_like_predict(
    exported: dict[str, tuple[Any, Path]], user_env: Any, kind: str
) -> None:
    from splitedge.cli import main
    from tests.test_server import start, stop
    from tests.test_shader_gl import need_gl

    model, bundle = exported[kind]
    assert main(["bundle", "verify", str(bundle)]) == 0
    policy = load_bundle(bundle).manifest["policy"]
    assert policy["task"] is None and policy["env"]["id"] == ENV
    discrete = policy["action"]["type"] == "discrete"
    obs = observations(user_env, continuous=not discrete)
    want = np.asarray(model.predict(obs, deterministic=True)[0])
    es2_tol = 0.0 if discrete else 2.0 / 256  # one 256th of the [-1, 1] action range
    served = start(bundle)
    try:
        for backend in ("ort", "gl33", "es31", "es2"):
            if backend != "ort":
                need_gl(backend)
            got = _act_all(bundle, backend, obs, served.port)
            agree = _agreement(got, want, discrete, es2_tol if backend == "es2" else 1e-4)
            assert agree >= (0.98 if backend == "es2" else 1.0), (kind, backend, agree)
    finally:
        stop(served)


def test_bytes_per_decision_are_the_features_not_the_frame(
    exported: dict[str, tuple[Any, Path]],
) -> None:
    for kind, (model, bundle) in exported.items():
        policy = load_bundle(bundle).manifest["policy"]
        out = policy["encoder"]["output"]
        item = 1 if out["dtype"] == "uint8" else 4
        assert policy["wire"]["split_bytes"] == out["shape"][0] * item, kind
        assert policy["wire"]["raw_bytes"] == int(np.prod(model.observation_space.shape)), kind
        # NatureCNN on 2x40x56: 64 channels x 1 x 3 after 8/4, 4/2, 3/1
        if kind == "ppo-cnnpolicy":
            assert out["shape"] == [64 * 1 * 3]


def test_unnormalised_model_keeps_its_input_scale(exported: dict[str, tuple[Any, Path]]) -> None:
    import json

    for kind, scale in (("ppo-unnormalised", 1.0), ("ppo-cnnpolicy", 1 / 255)):
        doc = json.loads((exported[kind][1] / "encoder_ir.json").read_text())
        assert doc["input"]["scale"] == pytest.approx(scale, rel=1e-12), kind


class DilatedCNN(UserCNN):
    """A user CNN the device cannot run exactly: its second conv is dilated."""

    def __init__(self, observation_space: gym.spaces.Box, features_dim: int = 32):
        super().__init__(observation_space, features_dim)
        self.cnn[2] = nn.Conv2d(6, 5, kernel_size=3, dilation=2)
        with torch.no_grad():
            n = self.cnn(torch.zeros(1, *observation_space.shape)).shape[1]
        self.linear = nn.Sequential(nn.Linear(n, features_dim), nn.ReLU())


class BatchNormCNN(UserCNN):
    def __init__(self, observation_space: gym.spaces.Box, features_dim: int = 32):
        super().__init__(observation_space, features_dim)
        self.cnn[1] = nn.BatchNorm2d(6)


@pytest.mark.parametrize(
    ("extractor", "argv", "message"),
    [
        (None, ["--env", "cartpole-pixels"], "gives observations of shape (3, 48, 48)"),
        (None, [], "pass --env ID_OR_ENTRY_POINT"),
        (None, ["--env", "no_such_module:Env"], "cannot import 'no_such_module'"),
        (None, ["--env", ENV, "--env-kwargs", "{bad"], "--env-kwargs is not JSON"),
        (DilatedCNN, ["--env", ENV], "DilatedCNN.cnn layer 2 (Conv2d): dilation=(2, 2)"),
        (BatchNormCNN, ["--env", ENV], "BatchNormCNN.cnn layer 1 (BatchNorm2d) has no device"),
    ],
)
def test_export_refuses_in_one_line_and_writes_nothing(
    user_env: Any,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    extractor: type | None,
    argv: list[str],
    message: str,
) -> None:
    from stable_baselines3 import PPO

    from splitedge.cli import main

    kwargs = {} if extractor is None else {"features_extractor_class": extractor}
    PPO("CnnPolicy", user_env.DotTrack(), policy_kwargs=kwargs, n_steps=64).save(
        tmp_path / "model.zip"
    )
    out = tmp_path / "bundle"
    assert main(["export", "--model", str(tmp_path / "model.zip"), "--out", str(out), *argv]) == 2
    err = capsys.readouterr().err
    assert message in err, err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    assert not out.exists() and sorted(p.name for p in tmp_path.iterdir()) == ["model.zip"]


def _algo_model(kind: str, dot_env: Any) -> Any:
    """Models built with SB3's own policy classes, beyond the served five above."""
    import stable_baselines3 as sb3

    box = dot_env.DotTrack(continuous=True)
    if kind == "a2c":
        return _decisive(sb3.A2C("CnnPolicy", dot_env.DotTrack(), seed=0))
    if kind == "ppo-box":
        return sb3.PPO("CnnPolicy", box, n_steps=64, seed=0)
    if kind == "ppo-separate-extractors":
        kwargs = {"share_features_extractor": False, "features_extractor_class": UserCNN}
        return _decisive(sb3.PPO("CnnPolicy", dot_env.DotTrack(), policy_kwargs=kwargs, seed=0))
    cls = {"td3": sb3.TD3, "ddpg": sb3.DDPG}[kind]
    return cls("CnnPolicy", box, buffer_size=100, seed=0)


@pytest.mark.parametrize("kind", ["a2c", "ppo-box", "ppo-separate-extractors", "td3", "ddpg"])
def test_every_algorithm_and_action_space_exports_exactly(
    user_env: Any, tmp_path: Path, kind: str
) -> None:
    import onnxruntime as ort

    from models.export import export_policy

    model = _algo_model(kind, user_env)
    model.save(tmp_path / "model.zip")
    continuous = kind in ("ppo-box", "td3", "ddpg")
    kwargs = {"continuous": True} if continuous else {}
    manifest = export_policy(
        tmp_path / "model.zip", tmp_path / "b", kind, "0.1.0", env=ENV, env_kwargs=kwargs
    )
    want_algo = {"ppo-box": "ppo", "ppo-separate-extractors": "ppo"}.get(kind, kind)
    assert manifest["policy"]["algorithm"] == want_algo
    obs = observations(user_env, continuous)
    want = np.asarray(model.predict(obs, deterministic=True)[0])
    enc = ort.InferenceSession(str(tmp_path / "b" / "encoder.onnx"))
    head = ort.InferenceSession(str(tmp_path / "b" / "head.onnx"))
    got = head.run(None, {"features": enc.run(None, {"observation": obs})[0]})[0]
    if continuous:
        np.testing.assert_allclose(got, want, rtol=0, atol=1e-4)
    else:
        assert np.array_equal(got, want)


def test_multi_input_policy_is_refused_in_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from stable_baselines3 import PPO

    from splitedge.cli import main

    class DictEnv(gym.Env):
        observation_space = gym.spaces.Dict(
            {"img": gym.spaces.Box(0, 255, (1, 36, 36), np.uint8), "v": gym.spaces.Box(-1, 1, (2,))}
        )
        action_space = gym.spaces.Discrete(2)

    PPO("MultiInputPolicy", DictEnv(), n_steps=64).save(tmp_path / "model.zip")
    argv = ["export", "--model", str(tmp_path / "model.zip"), "--out", str(tmp_path / "b")]
    assert main([*argv, "--env", ENV]) == 2
    err = capsys.readouterr().err
    assert "MultiInputPolicy" in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "b").exists()


def test_frames_file_replaces_the_env(
    user_env: Any, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from stable_baselines3 import PPO

    from splitedge.cli import main

    model = _decisive(PPO("CnnPolicy", user_env.DotTrack(), n_steps=64, seed=0))
    model.save(tmp_path / "model.zip")
    chw = observations(user_env, continuous=False, n=240, seed=3)
    np.save(tmp_path / "hwc.npy", chw.transpose(0, 2, 3, 1))  # (N, H, W, C) is read too
    np.save(tmp_path / "few.npy", chw[:50])
    np.save(tmp_path / "float.npy", chw.astype(np.float32))
    base = ["export", "--model", str(tmp_path / "model.zip"), "--out", str(tmp_path / "b")]
    for name, message in (
        ("few.npy", "50 observations; the self-check needs at least 200"),
        ("float.npy", "dtype float32; observations must be uint8"),
    ):
        assert main([*base, "--frames", str(tmp_path / name)]) == 2
        assert message in capsys.readouterr().err
        assert not (tmp_path / "b").exists()
    assert main([*base, "--frames", str(tmp_path / "hwc.npy")]) == 0
    policy = load_bundle(tmp_path / "b").manifest["policy"]
    assert policy["env"] is None and policy["calibration"]["source"] == "frames hwc.npy"
    assert policy["agreement"]["ort"] == {"observations": 200, "agree": 1.0}
