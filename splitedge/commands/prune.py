"""`splitedge prune`: remove old releases from a device (never the current or previous one)."""

from __future__ import annotations

import argparse

from splitedge.errors import os_errors_in_one_line
from splitedge.output import emit, table


def register(sub: argparse._SubParsersAction) -> None:
    from splitedge.commands.flash import add_ssh_options

    p = sub.add_parser(
        "prune",
        help="remove old releases, unused runtimes and unfinished transfers from a device",
        description="Keep the newest --keep releases besides the current and the previous one "
        "(never removed), and remove the rest, the runtimes no kept release uses, and unfinished "
        "transfers in incoming/. Refused while a switch is pending.",
    )
    p.add_argument("--host", required=True, help="USER@HOST[:PORT] or an ssh config alias")
    p.add_argument(
        "--keep",
        type=int,
        default=3,
        help="releases to keep besides current and previous, newest first (default: %(default)s)",
    )
    add_ssh_options(p)
    p.set_defaults(func=run)


@os_errors_in_one_line
def run(args: argparse.Namespace) -> int:
    from splitedge.errors import SplitedgeError

    if args.keep < 0:
        raise SplitedgeError(f"--keep {args.keep}: give 0 or more releases to keep")
    from splitedge.commands.flash import device_transport

    t = device_transport(args)
    r = t.op("prune", args.root, keep=str(args.keep), timeout_s=300)
    rows = [
        {"what": "kept", "items": ", ".join(r["kept"]) or "-"},
        {"what": "removed", "items": ", ".join(r["removed"]) or "-"},
        {"what": "runtimes removed", "items": ", ".join(r["runtimes_removed"]) or "-"},
        {"what": "transfers removed", "items": ", ".join(r["incoming_removed"]) or "-"},
        {"what": "freed", "items": f"{r['freed_mb']} MB"},
    ]
    emit({"host": args.host, **r}, args.json, table(rows, title=f"{args.host}: pruned"))
    return 0
