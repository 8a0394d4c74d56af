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
    llm = s.get("kind") == "llm"
    rows = [
        {"field": "root", "value": s["root"]},
        {
            "field": "current",
            "value": (s["current"] or "(none)")
            + (f" ({s['kind']} bundle)" if s.get("kind") else ""),
        },
        {"field": "previous", "value": s["previous"] or "(none)"},
        {"field": "releases", "value": ", ".join(s["releases"]) or "(none)"},
        {
            "field": "service",
            "value": "none: an llm bundle has no control loop"
            + (
                f" (yet {service.get('manager')} is {service.get('active')})"
                if service.get("pid")
                else ""
            )
            if llm
            else f"{service.get('manager')}: {service.get('active')}"
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
        {"field": "health detail", "value": _health_detail(health)},
        {
            "field": "signing key",
            "value": s.get("trusted_key") or "(none: signatures not required)",
        },
    ]
    emit({"host": args.host, **s}, args.json, table(rows, title=f"{args.host}"))
    return 0


def _health_detail(health: dict) -> str:
    """The last health check's numbers: llm probe ids, or policy probe diff and round trip."""
    if health.get("kind") == "llm":
        p = health.get("probe") or {}
        if p.get("check") == "probe":
            return (
                f"llm greedy probe: got {p.get('got_ids')}, expected {p.get('expected_ids')} "
                f"after {p.get('prompt_tokens')} prompt tokens"
            )
        return f"llm: {p.get('note')}; logits finite: {p.get('finite')}"
    enc, rt = health.get("encoder") or {}, health.get("round_trip") or {}
    if not enc:
        return "-"
    return (
        f"probe max diff {enc.get('max_diff_lsb')} LSB, round trip "
        f"{rt.get('rtt_ms')} ms to {rt.get('server')}"
    )
