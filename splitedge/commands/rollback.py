"""`splitedge rollback`: make the device's previous release current again."""

from __future__ import annotations

import argparse

from splitedge.errors import os_errors_in_one_line
from splitedge.output import emit, table


def register(sub: argparse._SubParsersAction) -> None:
    from splitedge.commands.flash import add_ssh_options

    p = sub.add_parser(
        "rollback",
        help="switch a device back to its previous release",
        description="Swap the device's `current` and `previous` releases atomically (or, with "
        "--to, make any release on the device current), restart its service and run the health "
        "check on the restored release. A release still pending after a flash just reverts.",
    )
    p.add_argument("--host", required=True, help="USER@HOST[:PORT] or an ssh config alias")
    p.add_argument(
        "--to",
        default="",
        metavar="VERSION",
        help="the release to go to: its version (1.0.0) or full name (cartpole-ppo-1.0.0), as "
        "`splitedge status` lists them (default: the previous release)",
    )
    add_ssh_options(p)
    p.set_defaults(func=run)


@os_errors_in_one_line
def run(args: argparse.Namespace) -> int:
    from deploy.flash.flasher import rollback_device
    from splitedge.commands.flash import device_transport
    from splitedge.errors import SplitedgeError

    t = device_transport(args)
    r = rollback_device(t, args.root, to=args.to)
    health = r["health"]
    rows = [
        {"field": "current", "value": r["current"]},
        {"field": "was", "value": r["rolled_back_from"]},
        {"field": "service", "value": r["service"]},
        {
            "field": "health",
            "value": "ok" if health.get("ok") else f"FAILED: {health.get('error')}",
        },
    ]
    emit(r, args.json, table(rows, title=f"{args.host}: rolled back"))
    if not health.get("ok"):
        raise SplitedgeError(
            f"rolled back to {r['current']}, but its health check failed: {health.get('error')}"
        )
    return 0
