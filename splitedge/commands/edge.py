"""`splitedge edge run`: the closed loop on the device against a policy server."""

from __future__ import annotations

import argparse
from pathlib import Path

from splitedge.commands._env_options import add_env_options, env_kwargs
from splitedge.errors import SplitedgeError
from splitedge.output import emit, table


def add_client_options(p: argparse.ArgumentParser) -> None:
    """Options shared by every command that runs the device loop."""
    p.add_argument(
        "--backend",
        default="auto",
        help="encoder backend: auto, ort, or a GL target (default: %(default)s)",
    )
    p.add_argument(
        "--deadline-ms",
        type=float,
        default=2000.0,
        help="per-decision deadline; past it the fallback action is used (default: %(default)s)",
    )
    p.add_argument(
        "--rpc",
        choices=("stream", "unary"),
        default="stream",
        help="one ActStream per session, or one Act call per step (default: %(default)s)",
    )
    p.add_argument(
        "--fallback",
        default="last",
        help="action on timeout/disconnect: 'last' or an integer action (default: %(default)s)",
    )


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("edge", help="run the device side of a split policy")
    esub = p.add_subparsers(dest="edge_command", metavar="ACTION", required=True)
    r = esub.add_parser(
        "run",
        help="closed loop: env -> encoder -> server -> action",
        description="Run the bundle's env closed-loop (--env, else the env or task it "
        "records): encode each observation on this device, ask the policy server for the "
        "action, step the env. Prints latency percentiles, bytes per step, fallbacks and "
        "peak RSS.",
    )
    r.add_argument("--bundle", type=Path, required=True, help="policy bundle directory or .tar")
    r.add_argument("--server", required=True, help="policy server HOST:PORT")
    r.add_argument(
        "--steps", type=int, default=500, help="decisions to make (default: %(default)s)"
    )
    r.add_argument(
        "--mode",
        choices=("split", "raw", "raw-png", "raw-jpeg"),
        default="split",
        help="send features (split) or frames (raw baselines) (default: %(default)s)",
    )
    r.add_argument(
        "--seed", type=int, default=0, help="seed for the env's episodes (default: %(default)s)"
    )
    add_env_options(r)
    r.add_argument(
        "--profile",
        default=None,
        help="device profile (deploy/devices) whose GPU limits the encoder must fit; refuses "
        "before connecting if it does not (default: no check)",
    )
    add_client_options(r)
    r.add_argument(
        "--actions-out",
        type=Path,
        default=None,
        metavar="FILE",
        help="write every action the env was stepped with, one JSON value per line, to "
        "compare two devices' runs (the result always shows the sequence's actions_sha256)",
    )
    r.add_argument(
        "--json", action="store_true", help="print the result as JSON instead of a table"
    )
    r.set_defaults(func=run)


def check_profile(name: str, bundle_root: Path) -> str:
    """One line on how the bundle's encoder fits a device profile; refuses one that does not."""
    try:
        from deploy.devices import check_encoder, load_profile
    except ImportError as e:
        raise SplitedgeError(
            f"--profile needs the device profiles in deploy/devices ({e}); run the check "
            "from a splitedge checkout, or drop --profile"
        ) from e
    profile = load_profile(name)
    try:
        return check_encoder(profile, bundle_root)
    except SplitedgeError as e:
        raise SplitedgeError(
            f"the bundle's encoder cannot run on {name}: {e}; export an encoder that fits "
            f"(splitedge export --profile {name}) or pick the device's real profile"
        ) from e


def run(args: argparse.Namespace) -> int:
    from edge.action_log import ActionLog
    from edge.agent import run_loop
    from edge.client import ClientConfig, PolicyClient, Unauthenticated
    from edge.envs import make_policy_env, policy_env_spec
    from edge.telemetry import peak_rss_mb, summarise
    from splitedge.bundle import load_bundle

    if args.steps < 1:
        raise SplitedgeError(f"--steps must be >= 1, got {args.steps}")
    bundle = load_bundle(args.bundle)
    fits = check_profile(args.profile, bundle.root) if args.profile else None
    kwargs = env_kwargs(args.env_kwargs)
    if args.actions_out is not None and not args.actions_out.parent.is_dir():
        raise SplitedgeError(f"--actions-out: no folder {args.actions_out.parent}")
    env = ActionLog(make_policy_env(bundle.policy, args.env, kwargs, seed=args.seed))
    cfg = ClientConfig(
        server=args.server,
        mode=args.mode,
        backend=args.backend,
        deadline_s=args.deadline_ms / 1e3,
        rpc=args.rpc,
        fallback=args.fallback,
    )
    client = PolicyClient(bundle, cfg)
    try:
        client.connect()
    except Unauthenticated as e:
        raise SplitedgeError(f"the policy server refused this device: {e}") from e
    except ConnectionError as e:
        raise SplitedgeError(
            f"cannot reach the policy server: {e}. Is `splitedge serve` running there?"
        ) from e
    with client:
        try:
            result = run_loop(client, args.steps, seed=args.seed, env=env)
        finally:
            env.close()
    if args.actions_out is not None:
        env.write(args.actions_out)
    summary = summarise(result.records)
    out = {
        "bundle": f"{bundle.name} {bundle.version}",
        "server": args.server,
        "mode": args.mode,
        "env": policy_env_spec(bundle.policy, args.env, kwargs)[0],
        "encoder_backend": client.encoder_reason or "none (raw mode)",
        **summary,
        "episodes": len(result.episode_returns),
        "mean_return": (sum(result.episode_returns) / len(result.episode_returns))
        if result.episode_returns
        else None,
        "reconnects": client.reconnects,
        "actions_sha256": env.digest,
        "decisions_per_s": args.steps / result.seconds,
        "peak_rss_mb": peak_rss_mb(),
        **({"profile": fits} if fits else {}),
    }
    rows = [{"metric": k, "value": v} for k, v in out.items()]
    emit(out, args.json, table(rows, title=f"edge run: {args.steps} decisions"))
    return 0
