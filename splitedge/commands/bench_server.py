"""`splitedge bench server`: decisions/s, p50/p99 and batch size of splitedge vs a naive SB3 server.

bench.py owns `splitedge bench`; this module adds its `server` subcommand. The CLI imports
every command module and calls `register`, which attaches `server` to the `bench` parser
unless bench.py already did through `add_server_parser`.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from splitedge.errors import SplitedgeError
from splitedge.output import emit, table

DEFAULT_SB3 = Path("models/zoo/cartpole-ppo.sb3.zip")


def register(sub: argparse._SubParsersAction) -> None:
    """Attach `server` to `splitedge bench` if the bench command has not done so itself."""
    bench = sub.choices.get("bench")
    if bench is None:
        return
    for action in bench._actions:
        if isinstance(action, argparse._SubParsersAction) and "server" not in action.choices:
            add_server_parser(action)


def add_server_parser(bench_subparsers: argparse._SubParsersAction) -> None:
    """Add `server` to the subparsers of `splitedge bench`."""
    p = bench_subparsers.add_parser(
        "server",
        help="policy server throughput and latency vs a naive SB3 server, side by side",
        description="Drive splitedge's policy server (split features and raw frames) and a "
        "naive gRPC server that calls the SB3 policy's predict once per request with the "
        "same closed-loop gRPC clients, in separate processes, at each client count and RPC "
        "style; print decisions/s, p50/p99 latency, mean batch size, server CPU per decision, "
        "and splitedge / naive ratios.",
    )
    p.add_argument("--bundle", type=Path, required=True, help="policy bundle directory or .tar")
    p.add_argument(
        "--sb3-model",
        type=Path,
        default=DEFAULT_SB3,
        help="the bundle's SB3 model for the naive server (default: %(default)s)",
    )
    p.add_argument(
        "--clients", default="1,4,16,64,256", help="client counts (default: %(default)s)"
    )
    p.add_argument(
        "--mode", default="unary,stream", help="RPC styles: unary, stream (default: %(default)s)"
    )
    p.add_argument(
        "--servers",
        default="split,raw,naive",
        help="from split (splitedge, features), raw (splitedge, frames), naive (SB3 predict) "
        "(default: %(default)s)",
    )
    p.add_argument(
        "--seconds",
        type=float,
        default=2.0,
        help="measuring window per cell, seconds (default: %(default)s)",
    )
    p.add_argument(
        "--warmup",
        type=float,
        default=0.5,
        help="untimed seconds before each window (default: %(default)s)",
    )
    p.add_argument(
        "--client-procs", type=int, default=4, help="client processes (default: %(default)s)"
    )
    p.add_argument(
        "--rounds",
        type=int,
        default=1,
        help="measure every cell this many times, interleaved; report medians (default: %(default)s)",
    )
    p.add_argument(
        "--server-arg",
        action="append",
        default=[],
        help="extra `splitedge serve` option, e.g. --server-arg=--max-batch=128 (repeatable)",
    )
    p.add_argument("--out", type=Path, help="also write a markdown report here")
    p.add_argument(
        "--json", action="store_true", help="print the result as JSON instead of a table"
    )
    p.set_defaults(func=run_server)


SERVER_NAMES = {"split": "splitedge split", "raw": "splitedge raw", "naive": "naive SB3"}


def _list(text: str, what: str) -> list[str]:
    values = [v.strip() for v in text.split(",") if v.strip()]
    if not values:
        raise SplitedgeError(f"{what} needs at least one value, got {text!r}")
    return values


def run_server(args: argparse.Namespace) -> int:
    from deploy.bench_server import BenchConfig, markdown, run

    try:
        clients = [int(c) for c in _list(args.clients, "--clients")]
    except ValueError as e:
        raise SplitedgeError(
            f"--clients must be comma-separated integers, got {args.clients!r}"
        ) from e
    servers = []
    for name in _list(args.servers, "--servers"):
        if name not in SERVER_NAMES:
            raise SplitedgeError(f"--servers takes split, raw, naive; got {name!r}")
        servers.append(SERVER_NAMES[name])
    cfg = BenchConfig(
        bundle=args.bundle,
        sb3_model=args.sb3_model,
        clients=clients,
        rpcs=_list(args.mode, "--mode"),
        servers=servers,
        seconds=args.seconds,
        warmup_s=args.warmup,
        client_processes=args.client_procs,
        rounds=args.rounds,
        server_args=list(args.server_arg),
    )
    progress = _progress(cfg.rounds * len(clients) * len(cfg.rpcs) * len(servers), quiet=args.json)
    result = run(cfg, progress)
    command = "splitedge " + " ".join(getattr(args, "argv", []) or ["bench", "server"])
    result["command"] = command
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(markdown(result))
    emit(result, args.json, text(result))
    return 0


def _progress(total: int, quiet: bool) -> Any:
    import sys

    done = [0]

    def report(what: str) -> None:
        if not what.startswith("starting"):
            done[0] += 1
        if not quiet:
            print(f"[{done[0]}/{total}] {what}", file=sys.stderr, flush=True)

    return report


COLUMNS = (
    "clients",
    "rpc",
    "server",
    "decisions_per_s",
    "p50_ms",
    "p99_ms",
    "mean_batch",
    "server_cpu_ms_per_decision",
    "errors",
)


def text(result: dict[str, Any]) -> str:
    """The human tables: every cell, then splitedge / naive per client count and RPC style."""
    parts = [table(result["rows"], COLUMNS, title=f"bench server: {result['bundle']}")]
    if result["ratios"]:
        parts.append(table(result["ratios"], title="splitedge / naive"))
    m = result["machine"]
    parts.append(
        f"{m['cpus']} CPUs, load average {m['loadavg_before'][0]:.1f} before, "
        f"{m['loadavg_after'][0]:.1f} after"
    )
    return "\n\n".join(parts)
