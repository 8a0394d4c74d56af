"""A delay-aware head distilled from a user's own model: an SB3 SAC trained outside
splitedge (no result.json) with the user's own features extractor, on the user's own env
(examples/byom's DotTrack, which declares no control rate). `splitedge train --distill-from
MODEL.zip --env ...` keeps the model's extractor class (its conv stack, the device's part, frozen),
records the env, and `splitedge export` turns the student into a server-history bundle
without being told the env again; what distillation cannot do is refused in one line."""

from __future__ import annotations

import json
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from splitedge.bundle import load_bundle
from splitedge.cli import main
from tests.conftest import D_TEST_DEPTH, D_TEST_LINKS, ROOT

USER_DIR = ROOT / "examples" / "byom"
ENV = "dot_env:DotTrack"
CONTINUOUS = '{"continuous": true}'
LINK, DEPTH = D_TEST_LINKS, D_TEST_DEPTH
# The user's own project module: their extractor, which the student must run too.
USER_POLICY = """
import torch
from stable_baselines3.common.torch_layers import BaseFeaturesExtractor
from torch import nn


class DotCNN(BaseFeaturesExtractor):
    def __init__(self, observation_space, features_dim=16):
        super().__init__(observation_space, features_dim)
        self.cnn = nn.Sequential(
            nn.Conv2d(observation_space.shape[0], 4, 3, stride=2), nn.ReLU(),
            nn.MaxPool2d(2), nn.Flatten(),
        )
        with torch.no_grad():
            n = self.cnn(torch.zeros(1, *observation_space.shape)).shape[1]
        self.fc = nn.Sequential(nn.Linear(n, features_dim), nn.ReLU())

    def forward(self, x):
        return self.fc(self.cnn(x))
"""


@pytest.fixture(scope="module")
def project(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """The user's folder: their policy module, a links file and a SAC model trained with SB3
    directly (a few steps: distillation must copy whatever the model does)."""
    from stable_baselines3 import SAC

    root = tmp_path_factory.mktemp("own")
    (root / "my_policy.py").write_text(USER_POLICY)
    (root / "links.toml").write_text(LINK)
    sys.path[:0] = [str(root), str(USER_DIR)]
    import dot_env
    import my_policy

    kwargs = {"features_extractor_class": my_policy.DotCNN}
    model = SAC("CnnPolicy", dot_env.DotTrack(continuous=True), policy_kwargs=kwargs,
                learning_starts=64, buffer_size=1000, batch_size=32, seed=0)  # fmt: skip
    model.learn(150)
    model.save(root / "teacher.zip")
    yield root
    for p in (str(root), str(USER_DIR)):
        sys.path.remove(p)


def _train(root: Path, *flags: str) -> int:
    return main([
        "train", "--distill-from", str(root / "teacher.zip"), "--delay-profile", "d-test",
        "--links-file", str(root / "links.toml"), "--timesteps", "700", "--no-progress",
        *flags,
    ])  # fmt: skip


@pytest.fixture(scope="module")
def student(project: Path) -> Path:
    out = project / "student"
    flags = ["--env", ENV, "--env-kwargs", CONTINUOUS, "--control-hz", "20", "--out", str(out)]
    assert _train(project, *flags) == 0
    return out


def test_the_student_runs_the_users_extractor_with_its_device_weights(
    project: Path, student: Path
) -> None:
    from models.delay_distill import _image_encoder
    from models.sb3_policy import load_model

    teacher = load_model(project / "teacher.zip")[0]
    model = load_model(student / "model.zip")[0]
    image = _image_encoder(model).image  # type: ignore[union-attr]
    assert type(image).__name__ == "DotCNN"
    want, got = _image_encoder(teacher).state_dict(), image.state_dict()
    assert want.keys() == got.keys()
    # the conv stack (the device's part) is the teacher's; its Linear, on the server, learnt
    assert all(torch.equal(want[k], got[k]) for k in want if k.startswith("cnn."))
    assert not torch.equal(want["fc.0.weight"], got["fc.0.weight"])
    result = json.loads((student / "result.json").read_text())
    cfg, rt = result["config"], result["realtime"]
    assert (cfg["task"], cfg["env_kwargs"], cfg["algo"], cfg["encoder"]) == (
        ENV, {"continuous": True}, "sac", "teacher",
    )  # fmt: skip
    assert (rt["action_history"], rt["history"], rt["teacher_extractor"]) == (
        DEPTH,
        "server",
        "DotCNN",
    )
    assert rt["control_hz"] == 20.0 and result["distill"]["rounds"]


def test_export_reads_the_env_from_the_run(student: Path) -> None:
    out = student.parent / "bundle"
    assert main(["export", "--model", str(student / "model.zip"), "--out", str(out)]) == 0
    policy = load_bundle(out).policy
    assert policy["env"] == {"id": ENV, "kwargs": {"continuous": True}}
    rt = policy["realtime"]
    assert (rt["action_history"], rt["history_source"]) == (DEPTH, "server")
    assert policy["agreement"]["ort"]["agree"] == 1.0  # onnxruntime acts like predict


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--env", ENV, "--env-kwargs", CONTINUOUS, "--control-hz", "20", "--algo", "ddpg"],
         "trains a student with"),
        (["--env", ENV, "--env-kwargs", CONTINUOUS], "declares no control rate"),
        (["--env", ENV, "--task", "pendulum-pixels"], "not both"),
        (["--env", ENV, "--env-kwargs", "[1]", "--control-hz", "20"], "must be a JSON object"),
    ],
)  # fmt: skip
def test_own_model_refusals_are_one_line(
    project: Path, flags: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert _train(project, "--out", str(project / "refused"), *flags) != 0
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1, err


def test_an_on_policy_model_or_a_user_env_without_a_teacher_is_refused(
    project: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    import dot_env
    from stable_baselines3 import PPO

    PPO("CnnPolicy", dot_env.DotTrack(), n_steps=64, seed=0).save(project / "ppo.zip")
    argv = ["train", "--delay-profile", "d-test", "--links-file", str(project / "links.toml"),
            "--env", ENV, "--control-hz", "20", "--out", str(project / "refused")]  # fmt: skip
    for extra, message in (
        (["--distill-from", str(project / "ppo.zip")], "imitates the deterministic actor"),
        ([], "your own env trains only a head distilled from your own model"),
    ):
        assert main([*argv, *extra]) != 0
        err = capsys.readouterr().err.strip()
        assert message in err and len(err.splitlines()) == 1, err


def test_a_missing_teacher_is_one_line(project: Path, capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["train", "--distill-from", str(project / "nowhere.zip"), "--env", ENV]
    assert main(argv) != 0
    err = capsys.readouterr().err.strip()
    assert "no model.zip there" in err and len(err.splitlines()) == 1, err
