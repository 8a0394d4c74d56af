"""`splitedge demo`: the shipped split policy over three links, next to raw offload."""

from __future__ import annotations

import argparse
from pathlib import Path

ZOO = Path(__file__).resolve().parents[2] / "models" / "zoo" / "cartpole-ppo"


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "demo",
        help="measure the shipped split policy over three emulated links",
        description="Run `splitedge measure` on the shipped CartPole bundle over "
        "the 3g, dsl and wifi link profiles, split vs raw vs raw-png offload.",
    )
    p.add_argument(
        "--bundle", type=Path, default=ZOO, help="policy bundle (default: the shipped one)"
    )
    p.add_argument("--links", default="dsl,3g,wifi", help="link profiles (default: %(default)s)")
    p.add_argument(
        "--steps", type=int, default=50, help="decisions per cell (default: %(default)s)"
    )
    p.add_argument(
        "--out",
        type=Path,
        default=Path("out/demo"),
        help="directory for results.json, results.csv and latency_cdf.png (default: %(default)s)",
    )
    p.add_argument(
        "--json", action="store_true", help="print the result as JSON instead of a table"
    )
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from splitedge.commands import measure

    ns = argparse.Namespace(
        bundle=args.bundle,
        links=args.links,
        modes="split,raw,raw-png",
        steps=args.steps,
        warmup=5,
        out=args.out,
        no_progress=False,
        json=args.json,
        backend="auto",
        deadline_ms=10_000.0,
        rpc="stream",
        fallback="last",
        markdown=None,
        clients="1",
        scale_links=None,
        link_backend="auto",
        self_check=False,
        argv=args.argv,
    )
    return measure.run(ns)
