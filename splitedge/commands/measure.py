"""`splitedge measure`: closed-loop decision latency over emulated links, split vs raw."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from splitedge.commands._env_options import add_env_options, env_kwargs
from splitedge.commands.edge import add_client_options
from splitedge.errors import SplitedgeError
from splitedge.output import emit


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "measure",
        help="decision latency over emulated links, split vs raw offload",
        description="Start a policy server, shape the path to it with each link "
        "profile, run the edge loop in each mode, and report p50/p95/p99 decision "
        "latency, bytes per step through the link, fallbacks and the analytic bound. "
        "With --loop realtime|both, also runs the env on a clock that never waits for the "
        "server and reports action age and stale ticks. Writes results.json, results.csv and "
        "latency_cdf.png (realtime.csv for real-time cells) under --out.",
    )
    p.add_argument("--bundle", type=Path, required=True, help="policy bundle directory or .tar")
    p.add_argument(
        "--links",
        default="3g,dsl,wifi",
        help="comma-separated link profiles from --links-file (default: %(default)s)",
    )
    p.add_argument(
        "--links-file",
        type=Path,
        default=None,
        help="TOML file of your own link profiles, one [name] table each with up_kbit, "
        "down_kbit, delay_ms and optionally jitter_ms, loss_pct, burst_bytes, mtu, queue_bytes, "
        "up_trace/down_trace, tcp_rto_min_ms (default: deploy/links.toml)",
    )
    p.add_argument(
        "--server",
        default=None,
        metavar="HOST:PORT",
        help="measure against this running policy server instead of starting one, with no "
        "emulation (--links ignored); TLS/token from SPLITEDGE_CA/CERT/KEY/TOKEN_FILE/TLS_NAME",
    )
    p.add_argument(
        "--server-up-kbit",
        type=float,
        default=None,
        help="with --server: your uplink rate for the bound (default: not charged)",
    )
    p.add_argument(
        "--server-down-kbit",
        type=float,
        default=None,
        help="with --server: your downlink rate for the bound (default: not charged)",
    )
    p.add_argument(
        "--modes",
        default="split,raw,raw-png",
        help="comma-separated: split, raw, raw-png, raw-jpeg (default: %(default)s)",
    )
    p.add_argument(
        "--steps",
        type=int,
        default=100,
        help="decisions per cell; ticks per real-time cell (default: %(default)s)",
    )
    p.add_argument(
        "--loop",
        choices=("sync", "realtime", "both"),
        default="sync",
        help="sync: the env waits for every action (decision latency); realtime: the env "
        "steps on a clock at --control-hz and each tick applies the newest action that has "
        "come back (held when none has; the fallback action before the first), reporting "
        "action age in ticks, the share of stale ticks and the return; both: each cell in "
        "both, the sync return beside the real-time one (default: %(default)s)",
    )
    p.add_argument(
        "--control-hz",
        type=float,
        default=None,
        metavar="HZ",
        help="real-time tick rate (default: the env's own, 1/dt or 1/tau, e.g. 50 for "
        "CartPole, 20 for Pendulum; an env that declares none needs this flag)",
    )
    p.add_argument(
        "--warmup", type=int, default=5, help="untimed decisions per cell (default: %(default)s)"
    )
    p.add_argument(
        "--out",
        type=Path,
        default=Path("out/measure"),
        help="directory for results (default: %(default)s)",
    )
    p.add_argument(
        "--markdown",
        type=Path,
        default=None,
        help="also write a markdown report (e.g. docs/results/latency.md)",
    )
    p.add_argument(
        "--clients",
        default="1",
        help="comma-separated numbers of concurrent edge clients, e.g. 1,4,16,64 "
        "(default: %(default)s)",
    )
    p.add_argument(
        "--scale-links",
        default=None,
        help="links that get the cells with more than one client (default: every link)",
    )
    p.add_argument(
        "--link-backend",
        choices=("auto", "netem", "tbf", "proxy"),
        default="auto",
        help="how links are shaped: kernel netem, kernel tbf + userspace delay, or the "
        "userspace proxy; auto picks the first that works here (default: %(default)s)",
    )
    p.add_argument(
        "--self-check",
        action="store_true",
        help="first check every available link backend against theory (28 KB and 512 B "
        "over 1 Mbit/s, 20 ms) and include the result",
    )
    p.add_argument(
        "--no-resume",
        action="store_true",
        help="measure every cell again, ignoring cells a stopped run left in --out/cells.jsonl "
        "(default: reuse those measured with the same settings)",
    )
    p.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    p.add_argument(
        "--json", action="store_true", help="print the result as JSON instead of a table"
    )
    add_env_options(p)
    add_client_options(p)
    # Measuring slow links: a raw frame over GPRS takes ~3 s, so the loop's 2 s default is too short.
    p.set_defaults(func=run, deadline_ms=30_000.0)


def run(args: argparse.Namespace) -> int:
    from deploy import report
    from deploy.cell_store import CellStore, check_writable
    from deploy.measure import MeasureConfig, measure
    from deploy.measure_json import cells_to_json

    try:
        clients = [int(n) for n in _split(args.clients)]
    except ValueError:
        raise SplitedgeError(
            f"--clients takes whole numbers like 1,4,16; got {args.clients!r}"
        ) from None
    cfg = MeasureConfig(
        bundle=args.bundle,
        links=["remote"] if args.server else _split(args.links),
        modes=_split(args.modes),
        steps=args.steps,
        warmup=args.warmup,
        backend=args.backend,
        rpc=args.rpc,
        deadline_s=args.deadline_ms / 1e3,
        clients=clients,
        scale_links=_split(args.scale_links) if args.scale_links else None,
        link_backend=args.link_backend,
        env=args.env,
        env_kwargs=env_kwargs(args.env_kwargs),
        links_file=args.links_file,
        server=args.server,
        server_up_kbit=args.server_up_kbit,
        server_down_kbit=args.server_down_kbit,
        loop=args.loop,
        control_hz=args.control_hz,
    )
    store = CellStore(args.out, resume=not args.no_resume)
    if args.self_check:
        check_writable(args.out)  # before minutes of self-check, not after
    checks = self_check_all() if args.self_check else []
    try:
        sweep = measure(cfg, progress=not args.no_progress, store=store)
    except KeyboardInterrupt:
        kept = _write_partial(store, cfg, checks)
        print(
            f"splitedge: interrupted; {kept} finished cell(s) kept in {args.out} "
            "(results.json, cells.jsonl); rerun the same command to measure the rest",
            file=sys.stderr,
        )
        return 130
    except SplitedgeError as e:
        kept = _write_partial(store, cfg, checks)
        if not kept:
            raise
        raise SplitedgeError(
            f"{e}; {kept} finished cell(s) kept in {args.out}, a rerun measures the rest"
        ) from None
    doc = cells_to_json(sweep, cfg)
    if checks:
        doc["self_check"] = checks
    paths = report.write(doc, args.out)
    store.finish()
    if getattr(args, "markdown", None):
        args.markdown.parent.mkdir(parents=True, exist_ok=True)
        args.markdown.write_text(report.markdown(doc, "splitedge " + " ".join(args.argv)))
        paths.append(args.markdown)
    text = report.render(doc) + "\nwrote " + ", ".join(str(p) for p in paths)
    emit({k: v for k, v in doc.items() if k != "latencies_ms"}, args.json, text)
    return 0


def _write_partial(store: Any, cfg: Any, checks: list[dict[str, Any]]) -> int:
    """Write results.json/csv from the cells finished so far; how many there are."""
    from deploy import report
    from deploy.measure_json import cells_to_json

    if store.sweep is None or not store.sweep.cells:
        return 0
    doc = cells_to_json(store.sweep, cfg)
    doc["partial"] = True
    if checks:
        doc["self_check"] = checks
    try:
        report.write(doc, store.out)
    except Exception:  # the cells are in cells.jsonl already; plots are a nicety here
        pass
    return len(store.sweep.cells)


def self_check_all() -> list[dict[str, Any]]:
    """Self-check rows for every link backend this machine can run (skipped ones say why)."""
    from deploy.link.kernel import BACKENDS, unavailable
    from deploy.link.selfcheck import run_self_check

    rows: list[dict[str, Any]] = []
    for backend in BACKENDS:
        why = unavailable(backend)
        if why:
            rows.append({"backend": backend, "message_B": "-", "ok": f"skipped: {why}"})
        else:
            rows += run_self_check(backend)
    return rows


def _split(s: str) -> list[str]:
    return [x.strip() for x in s.split(",") if x.strip()]
