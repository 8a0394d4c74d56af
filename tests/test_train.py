"""Training: every algorithm x encoder for a handful of real steps through `train()`.

Costs are checked against closed-form FLOP/parameter formulas written out here, not
against the FlopCounterMode the code uses.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from models.train import TrainConfig, train

TASK_OF = {"ppo": "cartpole-pixels", "sac": "pendulum-pixels", "ddpg": "reacher-pixels"}
ENCODERS = ("miniconv", "miniconv-es2", "naturecnn")
TINY: dict[str, dict[str, Any]] = {
    "ppo": {"timesteps": 256, "n_envs": 2, "hyper": {"n_steps": 64, "batch_size": 64}},
    "sac": {"timesteps": 260, "hyper": {"learning_starts": 200, "batch_size": 16}},
    "ddpg": {"timesteps": 160, "hyper": {"learning_starts": 100, "batch_size": 16}},
}


def _conv_out(n: int, k: int, s: int = 1) -> int:
    return (n - k) // s + 1


def miniconv_costs(c: int, h: int) -> tuple[int, int, int]:
    """(params, FLOPs, features) of the miniconv arch: 5x5/2 conv 8, 3x3 conv 8, pool 2, 3x3 conv 4, pool 2."""
    h1 = _conv_out(h, 5, 2)
    h2 = _conv_out(h1, 3)
    h3 = _conv_out(h2 // 2, 3)
    params = (c * 25 + 1) * 8 + (8 * 9 + 1) * 8 + (8 * 9 + 1) * 4
    flops = 2 * (c * 25 * 8 * h1 * h1 + 8 * 9 * 8 * h2 * h2 + 8 * 9 * 4 * h3 * h3)
    return params, flops, 4 * (h3 // 2) ** 2


def nature_costs(c: int, h: int) -> tuple[int, int, int]:
    """(params, FLOPs, features) of SB3's NatureCNN with a 512-unit linear layer."""
    h1 = _conv_out(h, 8, 4)
    h2 = _conv_out(h1, 4, 2)
    h3 = _conv_out(h2, 3)
    flat = 64 * h3 * h3
    params = (c * 64 + 1) * 32 + (32 * 16 + 1) * 64 + (64 * 9 + 1) * 64 + (flat + 1) * 512
    flops = 2 * (c * 64 * 32 * h1 * h1 + 32 * 16 * 64 * h2 * h2 + 64 * 9 * 64 * h3 * h3)
    return params, flops + 2 * flat * 512, 512


def mlp_flops(sizes: list[int]) -> int:
    return sum(2 * a * b for a, b in zip(sizes[:-1], sizes[1:], strict=True))


def head_sizes(algo: str, features: int) -> list[int]:
    if algo == "ppo":
        return [features, 64, 64, 2]  # pi net 64-64, two CartPole actions
    actions = 1 if algo == "sac" else 2  # Pendulum torque; reacher's two joints
    return [features, 256, 256, actions]


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[tuple[str, str], Path]:
    out = {}
    for algo, tiny in TINY.items():
        for encoder in ENCODERS:
            run = tmp_path_factory.mktemp(f"{algo}-{encoder}")
            cfg = TrainConfig(
                task=TASK_OF[algo],
                algo=algo,
                encoder=encoder,
                eval_episodes=1,
                random_episodes=2,
                **tiny,
            )
            train(cfg, run, progress=False)
            out[(algo, encoder)] = run
    return out


CELLS = [(a, e) for a in TINY for e in ENCODERS]


@pytest.mark.parametrize(("algo", "encoder"), CELLS)
def test_run_writes_result_with_curve(
    runs: dict[tuple[str, str], Path], algo: str, encoder: str
) -> None:
    result = json.loads((runs[(algo, encoder)] / "result.json").read_text())
    assert (runs[(algo, encoder)] / "model.zip").exists()
    assert result["config"]["algo"] == algo and result["config"]["encoder"] == encoder
    assert result["timesteps"] >= TINY[algo]["timesteps"]
    steps, returns = result["curve"]["steps"], result["curve"]["returns"]
    assert len(steps) == len(returns) == result["episodes"] >= 1
    assert steps == sorted(steps) and steps[-1] <= result["timesteps"]
    assert result["final_100_mean_return"] == pytest.approx(np.mean(returns[-100:]))
    assert result["train_seconds"] > 0


@pytest.mark.parametrize(("algo", "encoder"), CELLS)
def test_costs_match_closed_form(
    runs: dict[tuple[str, str], Path], algo: str, encoder: str
) -> None:
    costs = json.loads((runs[(algo, encoder)] / "result.json").read_text())["costs"]
    shape = {"ppo": (3, 48), "sac": (2, 40), "ddpg": (1, 40)}[algo]
    params, flops, features = (nature_costs if encoder == "naturecnn" else miniconv_costs)(*shape)
    head = mlp_flops(head_sizes(algo, features))
    assert (costs["encoder_params"], costs["encoder_flops"]) == (params, flops)
    assert costs["features_dim"] == features
    assert costs["head_flops"] == head
    assert costs["full_flops"] == flops + head
    assert costs["raw_bytes_per_step"] == shape[0] * shape[1] ** 2
    split = encoder != "naturecnn"
    assert costs["server_flops"] == (head if split else flops + head)
    assert costs["feature_bytes_per_step"] == (features if split else 0)


def test_miniconv_48_matches_hand_count() -> None:
    # independent arithmetic for the shipped CartPole encoder on 3x48x48 frames
    # conv0 5x5/2 -> 8x22x22, conv1 3x3 -> 8x20x20, pool -> 10, conv2 3x3 -> 4x8x8, pool -> 4x4x4
    macs = 3 * 25 * 8 * 22 * 22 + 8 * 9 * 8 * 20 * 20 + 8 * 9 * 4 * 8 * 8
    assert miniconv_costs(3, 48) == (1484, 2 * macs, 64)


def test_offpolicy_encoder_is_trained_by_the_critic_only(
    runs: dict[tuple[str, str], Path],
) -> None:
    from stable_baselines3 import DDPG, SAC

    for algo, cls in (("sac", SAC), ("ddpg", DDPG)):
        model = cls.load(runs[(algo, "miniconv")] / "model.zip", device="cpu")
        policy = model.policy
        encoder = policy.critic.features_extractor
        assert policy.actor.features_extractor.encoder is encoder  # one shared encoder
        enc_ids = {id(p) for p in encoder.parameters()}
        actor_opt = {id(p) for g in policy.actor.optimizer.param_groups for p in g["params"]}
        critic_opt = {id(p) for g in policy.critic.optimizer.param_groups for p in g["params"]}
        assert enc_ids <= critic_opt and not enc_ids & actor_opt
        obs = torch.rand((4, *model.observation_space.shape))
        policy.actor(obs).sum().backward()
        assert all(p.grad is None for p in encoder.parameters())  # actor sees detached features


def test_es2_scales_are_the_exporters_calibration(runs: dict[tuple[str, str], Path]) -> None:
    from stable_baselines3 import PPO

    from edge.encoder.calibrate import calibrate, task_frames, to_extra
    from models.encoders import FakeQuantAffine

    run = runs[("ppo", "miniconv-es2")]
    result = json.loads((run / "result.json").read_text())
    encoder = PPO.load(run / "model.zip", device="cpu").policy.features_extractor.encoder
    expected = to_extra(calibrate(encoder.ir, encoder.weights(), task_frames("cartpole-pixels")))
    assert result["es2_activation_quant"] == expected
    # the loaded model stores activations on that grid too (scales are not in the state dict)
    storage = [m for m in encoder.net if isinstance(m, FakeQuantAffine)]
    assert [(m.scale, m.zero_point) for m in storage] == [
        (q["scale"], q["zero_point"]) for q in expected
    ]


def test_bad_configs_say_what_is_allowed() -> None:
    with pytest.raises(ValueError, match="algo must be one of"):
        TrainConfig(algo="dqn")
    with pytest.raises(ValueError, match="encoder must be one of"):
        TrainConfig(encoder="resnet")
    with pytest.raises(ValueError, match="continuous actions"):
        TrainConfig(task="pendulum-pixels", algo="ppo")
    with pytest.raises(ValueError, match="discrete actions"):
        TrainConfig(task="cartpole-pixels", algo="sac")


def test_ppo_run_exports_a_bundle_that_verifies(
    runs: dict[tuple[str, str], Path], tmp_path: Path
) -> None:
    from models.export import export_policy
    from splitedge.cli import main

    export_policy(runs[("ppo", "miniconv")] / "model.zip", tmp_path / "b", "tiny", "0.0.1")
    assert main(["bundle", "verify", str(tmp_path / "b")]) == 0


def test_cli_trains_and_prints_json(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    from splitedge.cli import main

    monkeypatch.chdir(tmp_path)  # the default --out is relative: runs/learning/<cell>
    argv = ["train", "--task", "reacher-pixels", "--algo", "ddpg", "--timesteps", "100"]
    assert main([*argv, "--seed", "4", "--no-progress", "--json"]) == 0
    printed = json.loads(capsys.readouterr().out)
    run = tmp_path / "runs" / "learning" / "reacher-pixels-ddpg-miniconv-s4"
    saved = json.loads((run / "result.json").read_text())
    assert printed["out"] == str(Path("runs/learning/reacher-pixels-ddpg-miniconv-s4"))
    assert printed["final_100_mean_return"] == saved["final_100_mean_return"]
    assert saved["command"].startswith("splitedge train --task reacher-pixels --algo ddpg")
    assert (
        main(["train", "--algo", "sac", "--out", str(tmp_path / "x")]) != 0
    )  # CartPole is discrete


def test_sweep_covers_every_cell_once() -> None:
    from models.sweep import PLAN, commands

    cells = commands(Path("r"), [0, 1, 2], list(PLAN))
    assert len(cells) == len({d for d, _ in cells}) == 3 * 3 * 3
    for run_dir, argv in cells:
        task, algo = argv[argv.index("--task") + 1], argv[argv.index("--algo") + 1]
        assert PLAN[task][0] == algo and run_dir.parent == Path("r")
