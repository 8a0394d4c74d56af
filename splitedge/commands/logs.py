"""`splitedge logs`: a device's service log (timestamped) and its release events."""

from __future__ import annotations

import argparse
import subprocess

from splitedge.errors import os_errors_in_one_line
from splitedge.output import emit


def register(sub: argparse._SubParsersAction) -> None:
    from splitedge.commands.flash import add_ssh_options

    p = sub.add_parser(
        "logs",
        help="a device's service log and release events (switches, commits, reverts)",
        description="Print the last lines of the device's service log (the supervisor's "
        "timestamped run/service.log, or the systemd journal) and its release events; "
        "--follow keeps printing new lines until Ctrl-C.",
    )
    p.add_argument("--host", required=True, help="USER@HOST[:PORT] or an ssh config alias")
    p.add_argument(
        "--lines", type=int, default=50, help="how many last lines (default: %(default)s)"
    )
    p.add_argument(
        "--follow", action="store_true", help="keep printing new service lines until Ctrl-C"
    )
    add_ssh_options(p)
    p.set_defaults(func=run)


@os_errors_in_one_line
def run(args: argparse.Namespace) -> int:
    from splitedge.errors import SplitedgeError

    if args.lines < 1:
        raise SplitedgeError(f"--lines {args.lines}: give 1 or more")
    from splitedge.commands.flash import device_transport

    t = device_transport(args)
    r = t.op("logs", args.root, lines=str(args.lines), timeout_s=60)
    events = [
        f"{e['at']} {e['event']}: {e.get('from') or '-'} -> {e.get('to') or '-'}"
        + (f" ({e['why']})" if e.get("why") else "")
        for e in r["events"]
    ]
    text = "\n".join(
        [f"== release events ({r['root']}/state/history.jsonl)", *events]
        + (["== commit watchdog", *r["watchdog"]] if r["watchdog"] else [])
        + [f"== service ({r['source']})", *r["lines"]]
    )
    emit({"host": args.host, **r}, args.json, text)
    if not args.follow:
        return 0
    if r["source"].startswith("journalctl"):
        remote = ["journalctl", "-u", "splitedge.service", "-f", "-n", "0", "-o", "short-iso"]
    else:
        remote = ["tail", "-n", "0", "-F", f"{r['root']}/run/service.log"]
    try:
        return subprocess.run(t.ssh_argv(remote)).returncode
    except KeyboardInterrupt:
        return 0
