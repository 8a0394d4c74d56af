"""`splitedge soak`: the edge loop under sustained load, with CPU, RSS, temperature telemetry."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from splitedge.commands._env_options import add_env_options, env_kwargs
from splitedge.output import emit, table

ZOO = Path(__file__).resolve().parents[2] / "models" / "zoo" / "cartpole-ppo"


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "soak",
        help="run the edge loop for M minutes and report drift in rate, latency and RSS",
        description="Start a policy server, shape the path with a link profile, and run one "
        "edge loop for --minutes while it samples its CPU %, RSS, temperatures and "
        "throttling (thermal zones; vcgencmd on a Pi; tegrastats on a Jetson) every "
        "--interval seconds. Reports per-window frame rate, latency and RSS, and whether "
        "they drift. Writes soak.json and soak.png under --out.",
    )
    p.add_argument("--minutes", type=float, required=True, help="how long to run")
    p.add_argument("--bundle", type=Path, default=ZOO, help="policy bundle (default: shipped)")
    p.add_argument("--link", default="wifi", help="link profile (default: %(default)s)")
    p.add_argument(
        "--mode",
        choices=("split", "raw", "raw-png", "raw-jpeg"),
        default="split",
        help="what the edge sends (default: %(default)s)",
    )
    p.add_argument(
        "--link-backend",
        choices=("auto", "netem", "tbf", "proxy"),
        default="auto",
        help="how the link is shaped (default: %(default)s)",
    )
    p.add_argument("--backend", default="auto", help="encoder backend (default: %(default)s)")
    add_env_options(p)
    p.add_argument(
        "--interval", type=float, default=0.5, help="seconds between samples (default: 0.5)"
    )
    p.add_argument("--windows", type=int, default=6, help="windows compared (default: 6)")
    p.add_argument(
        "--out",
        type=Path,
        default=Path("out/soak"),
        help="directory for soak.json and soak.png (default: %(default)s)",
    )
    p.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    p.add_argument(
        "--json", action="store_true", help="print the result as JSON instead of a table"
    )
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from deploy.soak import SoakConfig, plot, soak

    cfg = SoakConfig(
        bundle=args.bundle,
        minutes=args.minutes,
        link=args.link,
        mode=args.mode,
        link_backend=args.link_backend,
        backend=args.backend,
        interval_s=args.interval,
        windows=args.windows,
        env=args.env,
        env_kwargs=env_kwargs(args.env_kwargs),
    )
    bar = _bar(not args.no_progress)
    try:
        doc = soak(cfg, on_step=lambda _: bar.update(1))
    finally:
        bar.close()
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "soak.json").write_text(json.dumps(doc, indent=2) + "\n")
    png = plot(doc, args.out / "soak.png")
    emit({k: v for k, v in doc.items() if k != "samples"}, args.json, _text(doc, args, png))
    return 0


def _bar(enabled: bool) -> Any:
    from tqdm import tqdm

    return tqdm(unit="step", disable=not enabled, leave=False, dynamic_ncols=True)


def _text(doc: dict[str, Any], args: argparse.Namespace, png: Path) -> str:
    drifting = [d["metric"] for d in doc["drift"] if d["drifts"]]
    verdict = f"drift in {', '.join(drifting)}" if drifting else "no drift beyond 10%"
    throttled = ", ".join(doc["throttled_bits_seen"]) or "never"
    return "\n\n".join(
        [
            table(doc["windows"], title=f"soak: {doc['decisions']} decisions in "
                  f"{doc['seconds']:.0f} s over {args.link} ({doc['link_backend']} backend)"),
            table(doc["drift"], title=f"first window vs last, slope per minute: {verdict}"),
            f"telemetry from: {', '.join(doc['sources'])}; throttled bits seen: {throttled}\n"
            f"wrote {args.out / 'soak.json'}, {png}",
        ]
    )  # fmt: skip
