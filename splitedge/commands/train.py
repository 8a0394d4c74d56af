"""`splitedge train`: SB3 training of a split policy on a pixel task."""

from __future__ import annotations

import argparse
from pathlib import Path

from splitedge.errors import SplitedgeError
from splitedge.output import emit, table


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "train",
        help="train a split policy with Stable-Baselines3",
        description="Train a split policy (MiniConv encoder + policy head) on a "
        "pixel task. Needs the `train` extra (torch==2.13.0, stable-baselines3).",
    )
    p.add_argument("--task", default="cartpole-pixels", help="pixel task (default: %(default)s)")
    p.add_argument("--algo", default="ppo", help="SB3 algorithm (default: %(default)s)")
    p.add_argument(
        "--encoder", default="miniconv", help="encoder architecture (default: %(default)s)"
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--timesteps", type=int, default=150_000, help="environment steps (default: %(default)s)"
    )
    p.add_argument("--out", type=Path, required=True, help="run directory (model.zip, result.json)")
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
    try:
        cfg = TrainConfig(
            task=args.task,
            algo=args.algo,
            encoder=args.encoder,
            seed=args.seed,
            timesteps=args.timesteps,
        )
    except ValueError as e:
        raise SplitedgeError(str(e)) from e
    result = train(cfg, args.out, progress=not args.no_progress)
    rows = [
        {"metric": k, "value": result[k]}
        for k in (
            "timesteps",
            "train_seconds",
            "final_100_mean_return",
            "deterministic_eval_mean_return",
            "random_policy_mean_return",
        )
    ]
    emit(result, args.json, table(rows, title=f"trained {cfg.algo} on {cfg.task} -> {args.out}"))
    return 0
