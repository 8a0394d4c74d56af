"""SB3 training of split policies on pixel tasks; one config dataclass per run."""

from __future__ import annotations

import json
import shlex
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from stable_baselines3.common.callbacks import BaseCallback

from edge.envs import make_env, tasks
from models.algos import ALGOS, DISCRETE_ALGOS, build
from models.baselines import ENCODERS, TEACHER_ENCODER
from models.realtime_training import DELAY_EXTRA_MS, extractor_kwargs, resolve, wrap_env

LEARNING_RATE = {"ppo": 3e-4, "sac": 1e-3, "ddpg": 5e-4}
N_ENVS = {"ppo": 8, "sac": 1, "ddpg": 1}
ES2_RECALIBRATE_EVERY = 2_000  # env steps between es2 scale recalibrations


@dataclass
class TrainConfig:
    """What to train; written into every run directory and bundle.

    :param task: pixel task name (edge.envs.tasks()); with `distill_from` a model trained
        elsewhere, also the user's own env (a gymnasium id or package.module:ClassName)
    :param env_kwargs: keyword arguments for a user's own env
    :param algo: "ppo" (discrete actions), "sac" or "ddpg" (continuous actions)
    :param encoder: "miniconv", "miniconv-es2" (8-bit quantisation-aware) or "naturecnn"
    :param n_envs: parallel envs (None: 8 for PPO, 1 off-policy)
    :param learning_rate: None: the algorithm's default (PPO's decays linearly to 0)
    :param hyper: overrides of the algorithm's SB3 keyword arguments
    :param threads: torch intra-op threads (1 lets runs share a small machine)
    :param delay_profile: a link profile (deploy/links.toml or `links_file`): train for its
        delay, delay-aware (models/realtime_training.py); None: no link delay
    :param links_file: the TOML file `delay_profile` is read from (None: deploy/links.toml)
    :param chunk: actions per answer (> 1: action chunks; continuous actions only)
    :param control_hz: the control rate the delay is counted in (None: the env's own)
    :param delay_extra_ms: time a decision spends off the link, added to its round trip
    :param distill_from: a plain run to imitate under the delay instead of RL
        (models/delay_distill.py; needs delay_profile, continuous actions, no chunk), or a
        user's own SB3 model.zip: then `algo` is its (sac; ddpg for TD3/DDPG) and `encoder`
        "teacher", its own features extractor
    """

    task: str = "cartpole-pixels"
    algo: str = "ppo"
    encoder: str = "miniconv"
    seed: int = 0
    timesteps: int = 150_000
    n_envs: int | None = None
    learning_rate: float | None = None
    hyper: dict[str, Any] = field(default_factory=dict)
    threads: int = 1
    eval_episodes: int = 20
    random_episodes: int = 100
    delay_profile: str | None = None
    links_file: str | None = None
    chunk: int = 1
    control_hz: float | None = None
    delay_extra_ms: float = DELAY_EXTRA_MS
    distill_from: str | None = None
    env_kwargs: dict[str, Any] = field(default_factory=dict)
    # a model trained elsewhere's (C, H, W): the user's env is conformed to it (None: ours)
    image_shape: tuple[int, ...] | None = field(default=None, init=False)
    # resolved from the four above: what result.json and the bundle record (None: plain)
    realtime: dict[str, Any] | None = field(default=None, init=False)

    def __post_init__(self) -> None:
        foreign = self._foreign_teacher()
        if self.algo not in ALGOS:
            raise ValueError(f"algo must be one of {ALGOS}, got {self.algo!r}")
        if self.encoder not in ENCODERS and not (foreign and self.encoder == TEACHER_ENCODER):
            raise ValueError(f"encoder must be one of {sorted(ENCODERS)}, got {self.encoder!r}")
        if self.task not in tasks() and foreign is None:
            raise ValueError(
                f"task must be one of {tasks()}, got {self.task!r}; your own env trains only a "
                "head distilled from your own model (--distill-from MODEL.zip)"
            )
        if self.env_kwargs and foreign is None:
            raise ValueError("--env-kwargs is for your own env, with --distill-from MODEL.zip")
        self.n_envs = N_ENVS[self.algo] if self.n_envs is None else self.n_envs
        if self.learning_rate is None:
            self.learning_rate = LEARNING_RATE[self.algo]
        if self.timesteps < 1 or self.n_envs < 1 or self.threads < 1:
            raise ValueError(
                f"timesteps ({self.timesteps}), n_envs ({self.n_envs}) and threads "
                f"({self.threads}) must be >= 1"
            )
        space = self.make().action_space
        discrete = hasattr(space, "n")
        if discrete != (self.algo in DISCRETE_ALGOS):
            kind = "discrete" if discrete else "continuous"
            raise ValueError(
                f"task {self.task!r} has {kind} actions, which {self.algo} cannot drive"
            )
        if foreign is not None and space != foreign.action_space:
            raise ValueError(
                f"env {self.task!r} acts in {space}, the teacher in {foreign.action_space}; "
                "pass the env (and --env-kwargs) the model was trained on"
            )
        self.realtime = resolve(
            self.task, self.encoder, discrete, self.delay_profile, self.links_file,
            self.chunk, self.control_hz, self.delay_extra_ms, self.env_kwargs,
        )  # fmt: skip
        if self.distill_from is not None:
            if self.realtime is None or self.realtime["strategy"] != "delay-aware":
                raise ValueError(
                    "--distill-from trains a delay-aware head: give --delay-profile, no --chunk"
                )
            if discrete:
                raise ValueError(
                    f"--distill-from needs continuous actions (sac or ddpg); {self.task} is discrete"
                )
            from models.delay_distill import check_teacher

            check_teacher(self.distill_from, self.task, self.algo, self.encoder)
            self.realtime["distilled_from"] = str(self.distill_from)
            if foreign is not None:
                self.realtime["teacher_extractor"] = foreign.extractor

    def _foreign_teacher(self) -> Any:
        """delay_distill.ForeignTeacher when distilling a model trained elsewhere (its algo
        and encoder checked against this config's), else None."""
        if self.distill_from is None:
            return None
        from models.delay_distill import foreign_teacher, teacher_record

        zip_path, ours = teacher_record(self.distill_from)
        if ours is not None:
            return None
        foreign = foreign_teacher(zip_path)
        want = {"algo": foreign.algo, "encoder": TEACHER_ENCODER}
        got = {"algo": self.algo, "encoder": self.encoder}
        if got != want:
            raise ValueError(
                f"--distill-from {self.distill_from} (a model trained elsewhere) trains a student "
                f"with {want}, not {got}; leave --algo and --encoder out"
            )
        self.image_shape = foreign.image_shape
        return foreign

    def make(self, seed: int | None = None) -> Any:
        """A fresh env of the task (a user's own conformed to the teacher's image shape)."""
        return make_env(self.task, seed=seed, expect_shape=self.image_shape, **self.env_kwargs)


class EpisodeCurve(BaseCallback):
    """Every finished training episode as (env steps so far, return), also appended to a
    `progress.jsonl` log so a long run can be watched (and a killed one still says how far it got)."""

    def __init__(self, log: Path | None = None) -> None:
        super().__init__()
        self.points: list[tuple[int, float]] = []
        self.log, self.t0 = log, time.time()

    def _on_step(self) -> bool:
        for info in self.locals["infos"]:
            if "episode" in info:
                self.record(int(self.num_timesteps), float(info["episode"]["r"]))
        return True

    def record(self, step: int, ret: float) -> None:
        """One point of the curve, appended to the log too."""
        self.points.append((step, ret))
        if self.log is not None:
            line = {"step": step, "return": ret, "s": round(time.time() - self.t0, 1)}
            with self.log.open("a") as f:
                f.write(json.dumps(line) + "\n")


def build_model(cfg: TrainConfig, teacher: Any = None) -> Any:
    """An SB3 model for the config: its algorithm with the chosen encoder as features
    extractor (encoder "teacher": the distillation teacher's own, loaded unless given)."""
    from stable_baselines3.common.env_util import make_vec_env

    venv = make_vec_env(
        lambda: wrap_env(cfg.make(), cfg.realtime), n_envs=cfg.n_envs, seed=cfg.seed
    )
    if cfg.encoder == TEACHER_ENCODER:
        from models.delay_distill import load_teacher, student_extractor

        if teacher is None:
            teacher = load_teacher(str(cfg.distill_from), cfg.task, cfg.algo, cfg.encoder)
        extractor = student_extractor(teacher)
    else:
        extractor = extractor_kwargs(cfg.encoder, venv.observation_space)
    assert cfg.learning_rate is not None  # resolved in __post_init__
    standard = cfg.encoder == TEACHER_ENCODER  # its layers after the conv stack learn too
    return build(cfg.algo, venv, extractor, cfg.learning_rate, cfg.seed, cfg.hyper, standard)


def evaluate(policy: Any, make: Callable[..., Any], episodes: int, seed: int) -> list[float]:
    """Episode returns of `policy(obs) -> action` (None = uniform random actions) in envs of
    `make(seed=...)` (TrainConfig.make)."""
    env = make(seed=seed)
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


def evaluate_model(
    model: Any, make: Callable[..., Any], episodes: int, seed: int,
    realtime: dict[str, Any] | None = None,
) -> list[float]:  # fmt: skip
    """Deterministic returns of a trained model over `episodes` episodes (10 envs batched),
    in the env as it trained (under its link's delay when `realtime` says so)."""
    from stable_baselines3.common.env_util import make_vec_env
    from stable_baselines3.common.evaluation import evaluate_policy

    venv = make_vec_env(lambda: wrap_env(make(), realtime), n_envs=min(10, episodes), seed=seed)
    rewards, _ = evaluate_policy(
        model, venv, n_eval_episodes=episodes, deterministic=True, return_episode_rewards=True
    )
    return [float(r) for r in rewards]


def train(
    cfg: TrainConfig, out: Path, progress: bool = True, command: str | None = None
) -> dict[str, Any]:
    """Train, save model.zip and result.json under out, and return the result.

    `command` is recorded as how the run was made (default: this process's argv)."""
    from models.flops import policy_costs
    from models.qat import Es2Calibration

    torch.set_num_threads(cfg.threads)
    out.mkdir(parents=True, exist_ok=True)
    teacher = None
    if cfg.distill_from is not None:
        from models.delay_distill import load_teacher

        teacher = load_teacher(cfg.distill_from, cfg.task, cfg.algo, cfg.encoder)
    model = build_model(cfg, teacher)
    (out / "progress.jsonl").unlink(missing_ok=True)
    curve = EpisodeCurve(out / "progress.jsonl")
    callbacks: list[BaseCallback] = [curve]
    choice = ENCODERS.get(cfg.encoder)
    es2 = Es2Calibration(cfg.task, ES2_RECALIBRATE_EVERY) if choice and choice.es2_qat else None
    if es2 is not None:
        callbacks.append(es2)
    t0 = time.time()
    distilled = None
    if teacher is not None:
        distilled = _distill(model, teacher, cfg, curve, progress)
    else:
        model.learn(total_timesteps=cfg.timesteps, progress_bar=progress, callback=callbacks)
    seconds = time.time() - t0
    model.save(out / "model.zip")
    returns = [r for _, r in curve.points]
    final = returns[-100:]
    det = evaluate_model(model, cfg.make, cfg.eval_episodes, cfg.seed + 10_000, cfg.realtime)
    rnd = evaluate(None, cfg.make, cfg.random_episodes, cfg.seed + 20_000)
    result = {
        "config": asdict(cfg),
        "command": command or " ".join(shlex.quote(a) for a in ["splitedge", *sys.argv[1:]]),
        "timesteps": int(distilled["steps"] if distilled else model.num_timesteps),
        "train_seconds": round(seconds, 1),
        "final_100_mean_return": float(np.mean(final)) if final else None,
        "final_100_episodes": len(final),
        "episodes": len(returns),
        "deterministic_eval_mean_return": float(np.mean(det)),
        "deterministic_eval_episodes": len(det),
        "random_policy_mean_return": float(np.mean(rnd)),
        "costs": policy_costs(model, cfg.algo, cfg.encoder),
        "es2_activation_quant": es2.scales if es2 is not None else None,
        "realtime": cfg.realtime,
        "distill": distilled,
        "curve": {"steps": [s for s, _ in curve.points], "returns": returns},
    }
    (out / "result.json").write_text(json.dumps(result, indent=2) + "\n")
    return result


def _distill(
    model: Any, teacher: Any, cfg: TrainConfig, curve: EpisodeCurve, progress: bool
) -> dict[str, Any]:
    """--distill-from: imitation under the delay in place of model.learn (delay_distill.py).
    The curve gets one point per DAgger round: the student's mean return under the delay."""
    from tqdm import tqdm

    from models.delay_distill import DistillConfig, distill
    from models.realtime_training import link_delay

    assert cfg.realtime is not None
    delay = link_delay(cfg.realtime)
    assert delay is not None
    dc = DistillConfig.for_budget(cfg.timesteps)
    bar = tqdm(total=dc.rounds, desc="distil (DAgger rounds)", disable=not progress)

    def on_round(row: dict[str, Any]) -> None:
        curve.record(int(row["steps"]), float(row["student_return"]))
        bar.set_postfix(ret=f"{row['student_return']:.1f}", loss=f"{row['loss']:.4f}")
        bar.update()

    try:
        return distill(model, teacher, cfg.make, delay, cfg.seed, dc, on_round)
    finally:
        bar.close()
