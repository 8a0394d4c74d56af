"""`splitedge train`: SB3 training of a split policy on a pixel task."""

from __future__ import annotations

import argparse
import shlex
from pathlib import Path

from splitedge.commands._env_options import env_kwargs
from splitedge.errors import SplitedgeError
from splitedge.output import emit, table

DEFAULT_RUNS = Path("runs") / "learning"


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "train",
        help="train a split policy with Stable-Baselines3",
        description="Train a policy (device encoder + server head) on a pixel task with "
        "PPO (discrete actions), SAC or DDPG (continuous actions). Writes model.zip and "
        "result.json (returns, learning curve, FLOPs, bytes per step) to the run directory. "
        "Needs the `train` extra (torch==2.13.0, stable-baselines3).",
    )
    p.add_argument(
        "--task",
        default=None,
        help="pixel task: cartpole-pixels, cartpole-camera (224x224 frames), pendulum-pixels "
        "or reacher-pixels (default: the --distill-from run's, else cartpole-pixels)",
    )
    p.add_argument(
        "--env",
        default=None,
        metavar="ID_OR_ENTRY_POINT",
        help="your own env instead of --task, for --distill-from MODEL.zip (a model you "
        "trained elsewhere): a gymnasium id or package.module:ClassName (importable here) "
        "giving uint8 image observations",
    )
    p.add_argument(
        "--env-kwargs",
        default=None,
        metavar="JSON",
        help="keyword arguments for --env, as a JSON object (e.g. '{\"size\": 48}')",
    )
    p.add_argument(
        "--algo",
        default=None,
        help="ppo, sac or ddpg (default: the --distill-from model's, else ppo)",
    )
    p.add_argument(
        "--encoder",
        default=None,
        help="miniconv, miniconv-es2, miniconv-camera (4x4 average first, for camera-size "
        "frames) or naturecnn (default: the --distill-from model's, else miniconv)",
    )
    p.add_argument(
        "--seed",
        type=int,
        default=0,
        help="seed for the envs, torch and SB3 (default: %(default)s)",
    )
    p.add_argument(
        "--timesteps", type=int, default=150_000, help="environment steps (default: %(default)s)"
    )
    p.add_argument(
        "--out",
        type=Path,
        default=None,
        help=f"run directory (default: {DEFAULT_RUNS}/<task>-<algo>-<encoder>[-<link>]"
        "[-chunk<H>]-s<seed>)",
    )
    p.add_argument("--threads", type=int, default=1, help="torch threads (default: %(default)s)")
    p.add_argument(
        "--delay-profile",
        default=None,
        metavar="LINK",
        help="train for a slow link: actions reach the env late by the link's round trip in "
        "control ticks (jitter included), and the policy reads the actions still in flight "
        "next to its features (a delay-aware head); with --chunk, chunks are played as the "
        "device plays them under that delay (default: no delay)",
    )
    p.add_argument(
        "--links-file",
        default=None,
        help="TOML file of link profiles for --delay-profile, as measure takes (default: "
        "deploy/links.toml)",
    )
    p.add_argument(
        "--delay-extra-ms",
        type=float,
        default=10.0,
        help="time a decision spends off the link (encoding, serialisation, the server), "
        "added to the link's round trip for --delay-profile: 3g's 300 ms measured 305.5 ms "
        "p50 through the proxy, 7 ticks at 20 Hz, not 6 (default: %(default)s)",
    )
    p.add_argument(
        "--chunk",
        type=int,
        default=1,
        metavar="H",
        help="the head answers each observation with the next H actions (sac/ddpg only); "
        "without --delay-profile they are trained as open-loop macro-actions, each "
        "--timesteps step then H ticks (default: 1)",
    )
    p.add_argument(
        "--control-hz",
        type=float,
        default=None,
        help="control rate for --delay-profile/--chunk (default: the env's own, from its dt "
        "or tau)",
    )
    p.add_argument(
        "--distill-from",
        default=None,
        metavar="RUN",
        help="with --delay-profile: learn the delay-aware head by imitating RUN, a plain "
        "policy of the same task, algo and encoder (sac/ddpg), instead of by RL: its encoder "
        "is kept and the head learns the teacher's action for the tick its own action will "
        "apply at (DIDA-style DAgger, models/delay_distill.py); --timesteps is then its budget "
        "of env steps (24000 fits Pendulum in ~2 min). RUN may also be your own SB3 "
        "model.zip (SAC, TD3 or DDPG on image observations, with --env): the student keeps "
        "its features extractor class and weights",
    )
    p.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    try:
        from models.train import TrainConfig, train
    except ImportError as e:
        raise SplitedgeError(
            f"training needs the train extra ({e}); run `pip install -e .[train]`"
        ) from e
    if args.env and args.task:
        raise SplitedgeError("give --task (one of ours) or --env (your own), not both")
    defaults = _teacher_defaults(args.distill_from) if args.distill_from else {}
    try:
        cfg = TrainConfig(
            task=args.env or args.task or defaults.get("task", "cartpole-pixels"),
            algo=args.algo or defaults.get("algo", "ppo"),
            encoder=args.encoder or defaults.get("encoder", "miniconv"),
            env_kwargs=env_kwargs(args.env_kwargs) or {},
            seed=args.seed,
            timesteps=args.timesteps,
            threads=args.threads,
            delay_profile=args.delay_profile,
            links_file=args.links_file,
            chunk=args.chunk,
            control_hz=args.control_hz,
            delay_extra_ms=args.delay_extra_ms,
            distill_from=args.distill_from,
        )
    except ValueError as e:
        raise SplitedgeError(str(e)) from e
    out = args.out or DEFAULT_RUNS / (
        f"{_safe(cfg.task)}-{cfg.algo}-{cfg.encoder}{_suffix(cfg)}-s{cfg.seed}"
    )
    argv = getattr(args, "argv", None)
    command = " ".join(shlex.quote(a) for a in ["splitedge", *argv]) if argv else None
    result = train(cfg, out, progress=not args.no_progress, command=command)
    costs = result["costs"]
    rows = [
        {"metric": k, "value": result[k]}
        for k in (
            "timesteps",
            "train_seconds",
            "final_100_mean_return",
            "deterministic_eval_mean_return",
            "random_policy_mean_return",
        )
    ] + [
        {"metric": k, "value": costs[k]}
        for k in ("encoder_params", "encoder_flops", "server_flops", "feature_bytes_per_step")
    ]
    if cfg.realtime is not None:
        rows.append({"metric": "latency_hiding", "value": _strategy(cfg.realtime)})
    text = table(rows, title=f"trained {cfg.algo} + {cfg.encoder} on {cfg.task} -> {out}")
    if args.json:
        result = {k: v for k, v in result.items() if k != "curve"} | {"out": str(out)}
    emit(result, args.json, text)
    return 0


def _teacher_defaults(path: str) -> dict[str, str]:
    """task/algo/encoder of the --distill-from model: its run's, or a model trained
    elsewhere's algorithm with its own extractor (encoder "teacher")."""
    from models.baselines import TEACHER_ENCODER
    from models.delay_distill import foreign_teacher, teacher_record

    zip_path, ours = teacher_record(path)
    if ours is not None:
        return {k: str(ours[k]) for k in ("task", "algo", "encoder")}
    return {"algo": foreign_teacher(zip_path).algo, "encoder": TEACHER_ENCODER}


def _safe(task: str) -> str:
    """A task or env id as a folder name (my_envs.dot:DotReach -> my_envs.dot-DotReach)."""
    return task.replace(":", "-").replace("/", "-")


def _suffix(cfg: object) -> str:
    """-<link> and/or -chunk<H> in the default run directory's name."""
    link = getattr(cfg, "delay_profile", None)
    chunk = getattr(cfg, "chunk", 1)
    distilled = "-distilled" if getattr(cfg, "distill_from", None) else ""
    return (f"-{link}" if link else "") + (f"-chunk{chunk}" if chunk > 1 else "") + distilled


def _strategy(record: dict[str, object]) -> str:
    """e.g. 'delay-aware, history 7 at 20 Hz (3g)' or 'chunk 8 (device play) at 20 Hz (3g)'."""
    where = f" at {record['control_hz']:g} Hz" + (
        f" ({record['link']})" if "link" in record else ""
    )
    if record["strategy"] == "chunk":
        return f"chunk {record['chunk_length']} ({record['chunk_play']} play){where}"
    how = ", distilled" if record.get("distilled_from") else ""
    return f"delay-aware, history {record['action_history']}{how}{where}"
