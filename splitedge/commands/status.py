"""`splitedge status`: what a device runs (active release, service state, last health check)."""

from __future__ import annotations

import argparse

from splitedge.output import emit, table


def register(sub: argparse._SubParsersAction) -> None:
    from splitedge.commands.flash import add_ssh_options

    p = sub.add_parser(
        "status",
        help="a device's active release, service state and last health check",
        description="Ask the device over ssh which release is current (and previous), "
        "whether its service runs, and what the last health gate found.",
    )
    p.add_argument("--host", required=True, help="USER@HOST[:PORT] or an ssh config alias")
    add_ssh_options(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from deploy.flash.transport import Target, Transport

    t = Transport(
        Target.parse(args.host),
        ssh_config=args.ssh_config,
        ssh_options=args.ssh_option,
        device_python=args.device_python,
    )
    s = t.op("status", args.root, timeout_s=60)
    health = s.get("last_health") or {}
    service = s.get("service") or {}
    rt = health.get("round_trip") or {}
    enc = health.get("encoder") or {}
    rows = [
        {"field": "root", "value": s["root"]},
        {"field": "current", "value": s["current"] or "(none)"},
        {"field": "previous", "value": s["previous"] or "(none)"},
        {"field": "releases", "value": ", ".join(s["releases"]) or "(none)"},
        {
            "field": "service",
            "value": f"{service.get('manager')}: {service.get('active')}"
            + (f", {service.get('state')}" if service.get("state") else "")
            + (
                f", {service['steps']} steps, {service.get('fallbacks', 0)} fallbacks"
                if "steps" in service
                else ""
            )
            + (f" ({service['error']})" if service.get("error") else ""),
        },
        {
            "field": "last health",
            "value": ("ok" if health.get("ok") else f"FAILED: {health.get('error')}")
            + f" at {health.get('at')} on {health.get('release')}"
            if health
            else "(never checked)",
        },
        {
            "field": "health detail",
            "value": f"probe max diff {enc.get('max_diff_lsb')} LSB, round trip "
            f"{rt.get('rtt_ms')} ms to {rt.get('server')}"
            if enc
            else "-",
        },
        {
            "field": "signing key",
            "value": s.get("trusted_key") or "(none: signatures not required)",
        },
    ]
    emit({"host": args.host, **s}, args.json, table(rows, title=f"{args.host}"))
    return 0
