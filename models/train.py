"""SB3 training of split policies on pixel tasks; one config dataclass per run."""

from __future__ import annotations

import json
import shlex
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from edge.envs import make_env
from models.encoders import ARCHS, MiniConvExtractor

ALGOS = ("ppo",)


@dataclass
class TrainConfig:
    """What to train; written into every run directory and bundle."""

    task: str = "cartpole-pixels"
    algo: str = "ppo"
    encoder: str = "miniconv"
    seed: int = 0
    timesteps: int = 150_000
    n_envs: int = 8
    learning_rate: float = (
        3e-4  # decays linearly to 0: PPO on CartPole collapses after solving otherwise
    )
    hyper: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.algo not in ALGOS:
            raise ValueError(f"algo must be one of {ALGOS}, got {self.algo!r}")
        if self.encoder not in ARCHS:
            raise ValueError(f"encoder must be one of {sorted(ARCHS)}, got {self.encoder!r}")
        if self.timesteps < 1 or self.n_envs < 1:
            raise ValueError(
                f"timesteps ({self.timesteps}) and n_envs ({self.n_envs}) must be >= 1"
            )


def _linear(start: float) -> Any:
    return lambda progress_remaining: progress_remaining * start


def build_model(cfg: TrainConfig) -> Any:
    """An SB3 model with the MiniConv encoder as its (shared) features extractor."""
    from stable_baselines3 import PPO
    from stable_baselines3.common.env_util import make_vec_env

    venv = make_vec_env(lambda: make_env(cfg.task), n_envs=cfg.n_envs, seed=cfg.seed)
    policy_kwargs = {
        "features_extractor_class": MiniConvExtractor,
        "features_extractor_kwargs": {"arch": cfg.encoder},
        "net_arch": {"pi": [64, 64], "vf": [64, 64]},
    }
    hyper = {
        "n_steps": 256,
        "batch_size": 256,
        "n_epochs": 4,
        "gamma": 0.99,
        "gae_lambda": 0.95,
        "clip_range": 0.2,
        "ent_coef": 0.0,
        **cfg.hyper,
    }
    return PPO(
        "CnnPolicy",
        venv,
        learning_rate=_linear(cfg.learning_rate),
        policy_kwargs=policy_kwargs,
        seed=cfg.seed,
        device="cpu",
        verbose=0,
        **hyper,
    )


def evaluate(policy: Any, task: str, episodes: int, seed: int) -> list[float]:
    """Episode returns of `policy(obs) -> action` (None = uniform random actions)."""
    env = make_env(task, seed=seed)
    returns = []
    for ep in range(episodes):
        obs, _ = env.reset(seed=seed + ep)
        done, total = False, 0.0
        while not done:
            action = env.action_space.sample() if policy is None else policy(obs)
            obs, reward, terminated, truncated, _ = env.step(action)
            total += reward
            done = terminated or truncated
        returns.append(total)
    return returns


def train(cfg: TrainConfig, out: Path, progress: bool = True) -> dict[str, Any]:
    """Train, save model.zip and result.json under out, and return the result."""
    torch.set_num_threads(max(1, torch.get_num_threads()))
    out.mkdir(parents=True, exist_ok=True)
    model = build_model(cfg)
    t0 = time.time()
    model.learn(total_timesteps=cfg.timesteps, progress_bar=progress)
    seconds = time.time() - t0
    model.save(out / "model.zip")
    final = [float(ep["r"]) for ep in model.ep_info_buffer]
    det = evaluate(
        lambda o: model.predict(o, deterministic=True)[0], cfg.task, 10, cfg.seed + 10_000
    )
    rnd = evaluate(None, cfg.task, 100, cfg.seed + 20_000)
    result = {
        "config": asdict(cfg),
        "command": " ".join(shlex.quote(a) for a in ["splitedge", *sys.argv[1:]]),
        "timesteps": int(model.num_timesteps),
        "train_seconds": round(seconds, 1),
        "final_100_mean_return": float(np.mean(final)) if final else None,
        "final_100_episodes": len(final),
        "deterministic_eval_mean_return": float(np.mean(det)),
        "random_policy_mean_return": float(np.mean(rnd)),
    }
    (out / "result.json").write_text(json.dumps(result, indent=2) + "\n")
    return result
