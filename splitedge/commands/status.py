"""`splitedge status`: what a device runs (active release, service state, last health check)."""

from __future__ import annotations

import argparse

from splitedge.errors import os_errors_in_one_line
from splitedge.output import emit, table


def register(sub: argparse._SubParsersAction) -> None:
    from splitedge.commands.flash import add_ssh_options

    p = sub.add_parser(
        "status",
        help="a device's releases, the last switch (pending/committed/reverted), service and health",
        description="Ask the device over ssh which release is current (and previous), whether "
        "the last switch is pending, committed or reverted (when and why), which encoder backend "
        "the service runs and why, what the last health gate found, and every release on the "
        "device with its version, bundle digest, date, size and state.",
    )
    p.add_argument("--host", required=True, help="USER@HOST[:PORT] or an ssh config alias")
    add_ssh_options(p)
    p.set_defaults(func=run)


@os_errors_in_one_line
def run(args: argparse.Namespace) -> int:

    from splitedge.commands.flash import device_transport

    t = device_transport(args)
    s = t.op("status", args.root, timeout_s=60)
    health = s.get("last_health") or {}
    service = s.get("service") or {}
    llm = s.get("kind") == "llm"
    rows = [
        {"field": "root", "value": s["root"]},
        {
            "field": "device",
            "value": f"{s.get('arch')}"
            + (f" (emulated on {s.get('machine')})" if s.get("arch") != s.get("machine") else "")
            + f", Python {s.get('python')}",
        },
        {
            "field": "current",
            "value": (s["current"] or "(none)")
            + (f" ({s['kind']} bundle)" if s.get("kind") else ""),
        },
        {"field": "previous", "value": s["previous"] or "(none)"},
        {"field": "release state", "value": transaction_line(s.get("transaction"))},
        {"field": "releases", "value": f"{len(s['releases'])} on the device (below)"},
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
        {"field": "backend", "value": _backend(s, service, health)},
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
    releases = [
        {k: r[k] for k in ("release", "version", "digest", "flashed_at", "size_mb", "state")}
        for r in s["releases"]
    ]
    text = table(rows, title=f"{args.host}") + "\n\n" + table(releases, title="releases")
    emit({"host": args.host, **s}, args.json, text)
    return 0


def _backend(s: dict, service: dict, health: dict) -> str:
    """The encoder backend the service actually runs (its own word), and why it was chosen."""
    if s.get("kind") == "llm":
        return "-"
    config = s.get("config") or {}
    running = service.get("backend") or (health.get("encoder") or {}).get("backend")
    chosen = config.get("backend")
    text = running or "(not reported yet)"
    if chosen:
        text += f"; flash chose {chosen}" + (
            f" ({config['backend_reason']})" if config.get("backend_reason") else ""
        )
    return text


def transaction_line(txn: dict | None) -> str:
    """The latest switch: pending (and when the device reverts it), committed, or reverted and why."""
    if not txn:
        return "(no switch recorded)"
    what = f"{txn['release']} ({txn.get('reason', 'flash')} from {txn.get('from') or 'empty'})"
    if txn["state"] == "pending":
        return (
            f"PENDING: {what} since {txn['started_at']}; the device reverts it at "
            f"{txn['deadline_at']} ({txn.get('seconds_left', '?')} s left) unless confirmed"
        )
    if txn["state"] == "committed":
        return f"committed: {what} at {txn['committed_at']}" + (
            f" ({txn['health']})" if txn.get("health") else ""
        )
    restored = txn.get("restored") or {}
    check = (
        f"; restored {restored['release']}: "
        + ("healthy" if restored.get("ok") else f"check FAILED: {restored.get('error')}")
        + (f", backend {restored['backend']}" if restored.get("backend") else "")
        if restored
        else ""
    )
    return (
        f"REVERTED: {what} at {txn['reverted_at']} by the {txn.get('by', 'device')}, back to "
        f"{txn.get('from') or 'empty'}: {txn.get('why')}{check}"
    )


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
