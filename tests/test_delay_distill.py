"""Delay-aware heads distilled from a plain policy (models/delay_distill.py): the samples
are the ones a hand replay of the teacher says, the student keeps the teacher's encoder,
fitting lowers the imitation loss, and `splitedge train --distill-from` refuses what it
cannot do in one line."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from edge.envs import make_env
from models.delay_distill import (
    Dataset,
    DistillConfig,
    adopt_encoder,
    fit,
    squashed,
    teacher_episodes,
)
from models.delay_wrapper import IN_FLIGHT_KEY
from models.realtime_training import IMAGE_KEY
from splitedge.bundle import load_bundle
from splitedge.cli import main
from tests.conftest import D_TEST_DEPTH, D_TEST_LINKS

LINK, DEPTH = D_TEST_LINKS, D_TEST_DEPTH
TINY = {"learning_starts": 64, "buffer_size": 1000, "batch_size": 32}


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny plain SAC teacher and a tiny student distilled from it, both exported."""
    from models.export import export_policy
    from models.train import TrainConfig, train

    root = tmp_path_factory.mktemp("distill")
    (root / "links.toml").write_text(LINK)
    common = {"task": "pendulum-pixels", "algo": "sac", "eval_episodes": 1, "random_episodes": 1}
    train(TrainConfig(timesteps=160, hyper=TINY, **common), root / "teacher", progress=False)
    student = TrainConfig(
        timesteps=900, delay_profile="d-test", links_file=str(root / "links.toml"),
        distill_from=str(root / "teacher"), **common,
    )  # fmt: skip
    train(student, root / "student", progress=False)
    for name in ("teacher", "student"):
        export_policy(root / name / "model.zip", root / f"{name}-bundle", name, "0.0.1")
    return root


def _models(runs: Path) -> tuple[object, object]:
    from models.sb3_policy import load_model

    return (
        load_model(runs / "teacher" / "model.zip", "sac")[0],
        load_model(runs / "student" / "model.zip", "sac")[0],
    )


def test_teacher_samples_are_its_replayed_episode(runs: Path) -> None:
    teacher, _ = _models(runs)
    data = Dataset()
    steps = teacher_episodes(teacher, "pendulum-pixels", DEPTH, 1, seed=5, data=data)
    assert steps == 200 and len(data) == 200 - DEPTH  # one whole episode
    env = make_env("pendulum-pixels")  # the replay, by hand
    obs, _ = env.reset(seed=6)  # teacher_episodes' first episode is seed + 1
    images, actions = [obs], []
    for _ in range(200):
        a, _ = teacher.predict(obs, deterministic=True)  # type: ignore[attr-defined]
        obs, *_ = env.step(a)
        images.append(obs)
        actions.append(np.asarray(a, np.float32).reshape(-1))
    for t in (0, 57, 196):
        assert np.array_equal(data.images[t], images[t])
        assert np.array_equal(data.windows[t], np.stack(actions[t : t + DEPTH]))
        # the label is the teacher's squashed action at t + D: predict's, rescaled to [-1, 1]
        want = np.asarray(actions[t + DEPTH]) / 2.0  # Pendulum's torque bounds are +-2
        assert np.allclose(data.labels[t], want, atol=1e-5)


def test_the_student_keeps_the_teachers_encoder(runs: Path) -> None:
    from models.delay_distill import _image_encoder

    t_model, s_model = _models(runs)
    want = _image_encoder(t_model).state_dict()
    got = _image_encoder(s_model).image.state_dict()  # type: ignore[union-attr]
    assert want.keys() == got.keys() and all(torch.equal(want[k], got[k]) for k in want)
    student = load_bundle(runs / "student-bundle").policy
    rt = student["realtime"]
    assert (rt["action_history"], rt["history_source"], rt["strategy"]) == (
        DEPTH, "server", "delay-aware",
    )  # fmt: skip
    result = json.loads((runs / "student" / "result.json").read_text())
    assert result["realtime"]["distilled_from"] == str(runs / "teacher")
    assert result["distill"]["rounds"] and result["timesteps"] >= 900


def test_fitting_lowers_the_imitation_loss(runs: Path) -> None:
    teacher, student = _models(runs)
    from models.train import TrainConfig, build_model

    fresh = build_model(
        TrainConfig(task="pendulum-pixels", algo="sac", timesteps=1, delay_profile="d-test",
                    links_file=str(runs / "links.toml"))
    )  # fmt: skip
    adopt_encoder(fresh, teacher)
    data = Dataset()
    teacher_episodes(teacher, "pendulum-pixels", DEPTH, 400, seed=1, data=data)
    images, windows, labels = data.tensors()

    def loss() -> float:
        with torch.no_grad():
            obs = {IMAGE_KEY: images, IN_FLIGHT_KEY: windows}
            return float(torch.nn.functional.mse_loss(squashed(fresh, obs), labels))

    before = loss()
    fit(fresh, data, DistillConfig(fit_steps=200), np.random.default_rng(0))
    assert loss() < 0.5 * before


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--distill-from", "TEACHER"], "--distill-from trains a delay-aware head"),
        (
            ["--delay-profile", "d-test", "--distill-from", "nowhere"],
            "no model.zip there",
        ),
        (
            ["--delay-profile", "d-test", "--chunk", "4", "--distill-from", "TEACHER"],
            "give --delay-profile, no --chunk",
        ),
        (
            ["--delay-profile", "d-test", "--distill-from", "STUDENT"],
            "the teacher must be a plain (sync) policy",
        ),
        (
            ["--delay-profile", "d-test", "--distill-from", "TEACHER", "--algo", "ddpg"],
            "the teacher is",
        ),
    ],
)
def test_distill_flags_are_one_line(
    runs: Path, flags: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    flags = [
        str(runs / "teacher") if f == "TEACHER" else str(runs / "student") if f == "STUDENT" else f
        for f in flags
    ]
    base = ["train", "--task", "pendulum-pixels", "--algo", "sac", "--timesteps", "200",
            "--links-file", str(runs / "links.toml"), "--out", str(runs / "refused")]  # fmt: skip
    if "--algo" in flags:
        base = base[:3] + base[5:]
    if "--delay-profile" not in flags:  # a links file alone is refused first
        base = base[: base.index("--links-file")] + base[base.index("--links-file") + 2 :]
    assert main([*base, *flags]) != 0
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1, err


def test_export_tells_float_rounding_from_a_real_disagreement(runs: Path) -> None:
    """models/proof.py rounding_only: the teacher's bundle against its own predict is
    explained (features on torch's grid, the head agrees); actions moved by 0.5 are not."""
    from models.proof import rounding_only
    from models.sb3_policy import predict, read_actor

    teacher, _ = _models(runs)
    env = make_env("pendulum-pixels")
    obs = np.stack([env.reset(seed=s)[0] for s in range(40)])
    want = predict(teacher, obs)
    actor = read_actor(teacher, "sac")
    bundle = runs / "teacher-bundle"
    evidence = rounding_only(actor, bundle, obs, want, teacher.action_space)  # type: ignore[attr-defined]
    width = load_bundle(bundle).policy["encoder"]["output"]["shape"][0]
    assert evidence is not None and evidence["feature_values"] == 40 * width
    assert evidence["feature_values_one_step_off"] <= 2  # a half step is rare
    assert evidence["head_on_torch_features"]["agree"] == 1.0
    moved = want + 0.5
    assert rounding_only(actor, bundle, obs, moved, teacher.action_space) is None  # type: ignore[attr-defined]
