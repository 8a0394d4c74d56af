"""Delay-aware policies distilled from a sync policy: `splitedge train --delay-profile LINK
--distill-from RUN`.

Reinforcement learning with the delay in the loop (models/realtime_training.py) learns
slowly: the reward of an action comes D ticks after it, and the state it acts on is D
ticks in the future. But a plain policy trained without delay (the teacher) already knows
what to do in every state; what a delayed controller needs is the teacher's action for
the state its own action will meet. With the actions in flight known (the server's record
of its last D answers, `history: "server"`) that state is a function of the observation
and those actions, so the delay-aware head can learn it by supervised imitation, the way
DIDA (Liotet et al., "Delayed Reinforcement Learning by Imitation", ICML 2022) does:

1. The teacher plays the undelayed env. At each tick t the actions it applies at ticks
   t .. t+D-1 are what a delayed controller would have in flight, and its action at
   t+D is the label: sample (observation t, actions t..t+D-1) -> teacher action t+D.
2. DAgger rounds: the student plays the delayed env (models/delay_wrapper.py, the
   device's rules), its own observations and windows are kept, and each is labelled with
   the teacher's action for the observation of the tick the student's action first
   applied at (its drawn delay, jitter included). Later rounds cover the states the
   student itself reaches.

The teacher is a `splitedge train` run, or a user's own SB3 model.zip (SAC, TD3 or DDPG
on an image env of theirs: `--env package.module:ClassName`); then the student runs that
model's own features extractor class (config.encoder "teacher") and its algorithm.

The student is the same model `--delay-profile` trains (InFlightExtractor: the encoder on
the image, the actions in flight after its features, then the head), its encoder copied
from the teacher and its device part frozen, so the device runs the teacher's encoder and
the head learns (with a foreign teacher's server-side layers after its conv stack, which
the student's own actor trains: SB3's standard policy class). Loss: mean squared error in
the policy's squashed action space ([-1, 1]).
Continuous actions (SAC, DDPG) only: a discrete teacher would need a cross-entropy head.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import gymnasium
import numpy as np
import torch

from edge.envs import make_env
from models.delay_wrapper import IN_FLIGHT_KEY, DelayedActions, LinkDelay
from models.realtime_training import IMAGE_KEY, ImageDict
from splitedge.errors import SplitedgeError

EnvMaker = Callable[[], Any]  # a fresh env, as the teacher sees it (uint8 C, H, W frames)


def env_maker(env: str | EnvMaker) -> EnvMaker:
    """A task name (edge.envs) as an EnvMaker; an EnvMaker as itself."""
    return (lambda: make_env(env)) if isinstance(env, str) else env


@dataclass(frozen=True)
class DistillConfig:
    """How much data and fitting: rounds of DAgger after the teacher's own episodes."""

    teacher_steps: int = 4000  # env steps of the teacher's own episodes (whole episodes)
    rounds: int = 10
    round_steps: int = 2000  # env steps of the student's episodes per round (whole episodes)
    epochs_per_round: int = 30  # passes over the data, at most fit_steps gradient steps
    fit_steps: int = 1500
    batch: int = 256
    learning_rate: float = 1e-3
    explore: float = 0.1  # Gaussian noise (squashed units) on the student's rollout actions

    @classmethod
    def for_budget(cls, timesteps: int) -> DistillConfig:
        """A config spending about `timesteps` env steps (whole episodes round it up): a
        sixth on the teacher's episodes, the rest over up to 10 DAgger rounds of >= 2000."""
        teacher = max(1, timesteps // 6)
        rounds = min(10, max(1, (timesteps - teacher) // 2000))
        return cls(teacher_steps=teacher, rounds=rounds,
                   round_steps=max(1, (timesteps - teacher) // rounds))  # fmt: skip


@dataclass
class Dataset:
    """Observations (images, windows of actions in flight) and the teacher's labels."""

    images: list[np.ndarray] = field(default_factory=list)
    windows: list[np.ndarray] = field(default_factory=list)
    labels: list[np.ndarray] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.labels)

    def tensors(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return (
            torch.as_tensor(np.stack(self.images)),
            torch.as_tensor(np.stack(self.windows), dtype=torch.float32),
            torch.as_tensor(np.stack(self.labels), dtype=torch.float32),
        )


def teacher_record(path: str | Path) -> tuple[Path, dict[str, Any] | None]:
    """(the teacher's model.zip, the config of the `splitedge train` run that made it, or
    None for a model trained elsewhere); one-line SplitedgeError without a model.zip."""
    p = Path(path)
    zip_path = p / "model.zip" if p.is_dir() else p
    if not zip_path.is_file():
        raise SplitedgeError(
            f"--distill-from {path}: no model.zip there; give a `splitedge train` run "
            "directory or your own SB3 model.zip (SAC, TD3 or DDPG)"
        )
    try:
        cfg = json.loads((zip_path.parent / "result.json").read_text()).get("config")
    except (OSError, ValueError, AttributeError):  # none, not JSON, or not ours
        cfg = None
    ours = isinstance(cfg, dict) and all(k in cfg for k in ("task", "algo", "encoder"))
    return zip_path, cfg if ours else None


def check_teacher(path: str | Path, task: str, algo: str, encoder: str) -> Path:
    """The teacher's model.zip; a `splitedge train` run's result.json is checked against the
    student's task, algorithm and encoder (one-line SplitedgeError otherwise). A model
    trained elsewhere is checked by foreign_teacher. Cheap: it reads only result.json."""
    zip_path, cfg = teacher_record(path)
    if cfg is None:
        return zip_path
    want = {"task": task, "algo": algo, "encoder": encoder}
    got = {k: cfg.get(k) for k in want}
    if got != want:
        raise SplitedgeError(f"--distill-from {path}: the teacher is {got}, the student {want}")
    if cfg.get("realtime"):
        raise SplitedgeError(
            f"--distill-from {path}: the teacher must be a plain (sync) policy; it was trained "
            f"as {cfg['realtime'].get('strategy')}"
        )
    return zip_path


@dataclass(frozen=True)
class ForeignTeacher:
    """What the student takes from a model trained elsewhere (a user's own SB3 model)."""

    algo: str  # the student's: sac, or ddpg for a TD3 or DDPG teacher (the same actor)
    image_shape: tuple[int, ...]  # (C, H, W), as the teacher reads it
    action_space: Any
    extractor: str  # its features extractor's class, which the student runs too


STUDENT_ALGO = {"sac": "sac", "td3": "ddpg", "ddpg": "ddpg"}


def foreign_teacher(zip_path: Path) -> ForeignTeacher:
    """Load a model trained elsewhere and say what the student needs; one-line refusals for
    what distillation cannot imitate (on-policy or discrete actors, non-image observations)."""
    model, algo = _load_foreign(zip_path)
    if algo not in STUDENT_ALGO:
        raise SplitedgeError(
            f"--distill-from {zip_path}: a {algo.upper()} model; distillation imitates the "
            "deterministic actor of SAC, TD3 or DDPG (continuous actions)"
        )
    space = model.observation_space
    shape = tuple(int(d) for d in (getattr(space, "shape", None) or ()))
    if not isinstance(space, gymnasium.spaces.Box) or len(shape) != 3:
        raise SplitedgeError(
            f"--distill-from {zip_path}: observations are {type(space).__name__} {shape or ''}, "
            "not a (C, H, W) image; the device part of a split policy is an image encoder"
        )
    return ForeignTeacher(STUDENT_ALGO[algo], shape, model.action_space,
                          type(_image_encoder(model)).__name__)  # fmt: skip


def _load_foreign(zip_path: Path) -> tuple[Any, str]:
    """(model, algorithm) of a model trained elsewhere, loaded once per process and file
    version: the CLI's defaults, TrainConfig's checks and training all read it."""
    p = zip_path.resolve()
    return _load_cached(p, p.stat().st_mtime_ns)


@functools.lru_cache(maxsize=4)
def _load_cached(path: Path, _version: int) -> tuple[Any, str]:
    from models.sb3_policy import load_model

    return load_model(path)


def student_extractor(teacher: Any) -> dict[str, Any]:
    """SB3 policy kwargs for a student around a foreign teacher's own features extractor:
    the same class and arguments on the image, and the same image scaling."""
    from models.realtime_training import InFlightExtractor

    policy = teacher.policy
    return {
        "features_extractor_class": InFlightExtractor,
        "features_extractor_kwargs": {
            "image_class": type(_image_encoder(teacher)),
            "image_kwargs": dict(policy.features_extractor_kwargs),
        },
        "normalize_images": bool(policy.normalize_images),
    }


def load_teacher(path: str | Path, task: str, algo: str, encoder: str) -> Any:
    """The checked teacher's SB3 model (check_teacher); a model trained elsewhere loads as
    the algorithm it was saved by."""
    from models.sb3_policy import load_model

    zip_path, cfg = teacher_record(path)
    if cfg is None:
        return _load_foreign(zip_path)[0]
    return load_model(check_teacher(path, task, algo, encoder), algo)[0]


def _image_encoder(model: Any) -> torch.nn.Module:
    from models.algos import DetachedFeatures

    extractor = model.policy.actor.features_extractor
    return extractor.encoder if isinstance(extractor, DetachedFeatures) else extractor


def device_part(extractor: torch.nn.Module) -> torch.nn.Module:
    """What of an image extractor runs on the device, as export cuts it: a MiniConvExtractor
    whole; else its one nn.Sequential holding Conv2d layers (the rest runs on the server)."""
    from models.encoders import MiniConvExtractor
    from models.sb3_policy import conv_sequences

    if isinstance(extractor, MiniConvExtractor):
        return extractor
    convs = conv_sequences(extractor)
    return convs[0][1] if len(convs) == 1 else extractor


def adopt_encoder(student: Any, teacher: Any) -> None:
    """Copy the teacher's image extractor into the student's and freeze its device part, so
    the device runs the teacher's encoder; server-side layers after it (a model trained
    elsewhere's Linear, say) start from the teacher's and learn with the head."""
    inner = _image_encoder(student)
    target = getattr(inner, "image", None)
    if target is None:
        raise SplitedgeError("the student is not a delay-aware model (no InFlightExtractor)")
    target.load_state_dict(_image_encoder(teacher).state_dict())
    for p in device_part(target).parameters():
        p.requires_grad_(False)


def squashed(model: Any, obs: Any) -> torch.Tensor:
    """The deterministic action in the policy's squashed space (B, width); differentiable."""
    return model.policy._predict(obs, deterministic=True).reshape(-1, int(np.prod(
        model.action_space.shape)))  # fmt: skip


def teacher_labels(teacher: Any, images: np.ndarray, batch: int = 512) -> np.ndarray:
    """The teacher's squashed actions for uint8 images (N, C, H, W)."""
    out = []
    with torch.no_grad():
        for i in range(0, len(images), batch):
            out.append(squashed(teacher, torch.as_tensor(images[i : i + batch])).numpy())
    return np.concatenate(out)


def _unscale(model: Any, action: np.ndarray) -> np.ndarray:
    return model.policy.unscale_action(np.clip(np.asarray(action, np.float32), -1, 1))


def teacher_episodes(
    teacher: Any, env: str | EnvMaker, depth: int, min_steps: int, seed: int, data: Dataset
) -> int:
    """Step 1 of the module doc: the teacher's undelayed episodes as delayed samples, whole
    episodes until `min_steps` env steps; returns the env steps."""
    steps, ep, make = 0, 0, env_maker(env)
    while steps < min_steps:
        ep += 1
        play = make()
        obs, _ = play.reset(seed=seed + ep)
        images, actions, done = [obs], [], False
        while not done:
            action, _ = teacher.predict(obs, deterministic=True)
            obs, _, terminated, truncated, _ = play.step(action)
            images.append(obs)
            actions.append(np.asarray(action, np.float32).reshape(-1))
            done = terminated or truncated
        steps += len(actions)
        labels = teacher_labels(teacher, np.stack(images))
        for t in range(len(actions) - depth):
            data.images.append(images[t])
            data.windows.append(np.stack(actions[t : t + depth]))
            data.labels.append(labels[t + depth])
    return steps


def student_episodes(
    student: Any, teacher: Any, env: str | EnvMaker, delay: LinkDelay, min_steps: int,
    seed: int, explore: float, data: Dataset,
) -> tuple[int, list[float]]:  # fmt: skip
    """Step 2: the student's episodes under the delay, labelled by the teacher, whole
    episodes until `min_steps` env steps; (env steps, returns of the episodes)."""
    rng = np.random.default_rng(seed)
    steps, returns, ep, make = 0, [], 0, env_maker(env)
    while steps < min_steps:
        ep += 1
        play = DelayedActions(ImageDict(make()), delay, seed + ep, history="chosen")
        obs, _ = play.reset(seed=seed + ep)
        seen: list[dict[str, np.ndarray]] = [obs]
        applies: list[int] = []  # the tick each action first applies at
        done, total, tick = False, 0.0, 0
        while not done:
            with torch.no_grad():
                batch = {k: torch.as_tensor(v[None]) for k, v in obs.items()}
                a = squashed(student, batch).numpy()[0]
            a = a + explore * rng.standard_normal(a.shape).astype(np.float32)
            action = _unscale(student, a).reshape(student.action_space.shape)
            obs, reward, terminated, truncated, info = play.step(action)
            applies.append(tick + int(info["action_delay_ticks"]))
            seen.append(obs)
            total, tick, done = total + float(reward), tick + 1, terminated or truncated
        steps += tick
        returns.append(total)
        labels = teacher_labels(teacher, np.stack([o[IMAGE_KEY] for o in seen]))
        for t, at in enumerate(applies):
            if at < len(seen):
                data.images.append(seen[t][IMAGE_KEY])
                data.windows.append(seen[t][IN_FLIGHT_KEY])
                data.labels.append(labels[at])
    return steps, returns


def fit(student: Any, data: Dataset, cfg: DistillConfig, rng: np.random.Generator) -> float:
    """Fit the student's head to the labels; the last epoch's mean loss."""
    images, windows, labels = data.tensors()
    params = [p for p in student.policy.actor.parameters() if p.requires_grad]
    optimiser = torch.optim.Adam(params, lr=cfg.learning_rate)
    n = len(labels)
    steps = min(cfg.fit_steps, max(1, cfg.epochs_per_round * n // cfg.batch))
    student.policy.set_training_mode(True)
    losses: list[float] = []
    for _ in range(steps):
        idx = torch.as_tensor(rng.integers(0, n, size=min(cfg.batch, n)))
        obs = {IMAGE_KEY: images[idx], IN_FLIGHT_KEY: windows[idx]}
        loss = torch.nn.functional.mse_loss(squashed(student, obs), labels[idx])
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
        losses.append(float(loss.detach()))
    student.policy.set_training_mode(False)
    return float(np.mean(losses[-max(1, steps // 10) :]))


def distill(
    student: Any, teacher: Any, env: str | EnvMaker, delay: LinkDelay, seed: int,
    cfg: DistillConfig = DistillConfig(), on_round: Callable[[dict[str, Any]], None] | None = None,
) -> dict[str, Any]:  # fmt: skip
    """Train `student` (a delay-aware SB3 model) to imitate `teacher` under `delay` (see the
    module doc); returns what result.json keeps: steps, per-round returns and losses."""
    if not isinstance(student.action_space, gymnasium.spaces.Box):
        raise SplitedgeError("--distill-from needs continuous actions (sac or ddpg)")
    adopt_encoder(student, teacher)
    rng = np.random.default_rng(seed)
    torch.manual_seed(seed)
    data = Dataset()
    steps = teacher_episodes(teacher, env, delay.max_ticks, cfg.teacher_steps, seed, data)
    rounds = []
    loss = fit(student, data, cfg, rng)
    for r in range(cfg.rounds):
        s, returns = student_episodes(
            student, teacher, env, delay, cfg.round_steps,
            seed + 1000 * (r + 1), cfg.explore, data,
        )  # fmt: skip
        steps += s
        row = {"round": r, "student_return": float(np.mean(returns)), "loss_before": loss,
               "samples": len(data), "steps": steps}  # fmt: skip
        loss = fit(student, data, cfg, rng)
        row["loss"] = loss
        rounds.append(row)
        if on_round is not None:
            on_round(row)
    return {"steps": steps, "rounds": rounds, "samples": len(data), "config": cfg.__dict__}
