"""After the switch: the health gate, then commit or revert (the device's commit model).

The device holds a switched release as *pending* and reverts it by itself at the
deadline (device_commit.py); this side runs the gate within that deadline and
either confirms it (`commit`) or reverts at once. When the flasher is stopped
(Ctrl-C) it still asks for the revert; when it loses the device it says when the
device will revert on its own.
"""

from __future__ import annotations

import json
import time
from typing import Any, Protocol

from deploy.flash.transport import DeviceRefused, Transport
from splitedge.errors import SplitedgeError


class Steps(Protocol):
    def done(self, step: str, detail: str) -> None: ...


def device_health(
    t: Transport,
    root: str,
    python: str,
    server: str | None,
    timeout_s: float = 120,
    out: str | None = "state/health.json",
) -> dict[str, Any]:
    """Run `edge.service health` on the device's current release; its JSON result."""
    argv = [python, "-m", "edge.service", "health", "--release", f"{root}/current"]
    argv += ["--out", f"{root}/{out}"] if out else []
    r = t.run(argv + (["--server", server] if server else []), timeout_s=timeout_s, check=False)
    lines = [ln for ln in r.stdout.splitlines() if ln.startswith("{")]
    if not lines:
        return {
            "ok": False,
            "error": f"health check did not run (exit {r.returncode}): {r.stderr.strip()[-300:]}",
        }
    return dict(json.loads(lines[-1]))


def health_gate(
    t: Transport,
    root: str,
    python: str,
    server: str | None,
    settle_s: float = 0.5,
    llm: bool = False,
    timeout_s: float = 120,
) -> dict[str, Any]:
    """Probe + round trip on the device, then make sure the restarted service is still up.

    llm: the bundle's greedy probe only; it has no server and no service to check.
    """
    gate = device_health(t, root, python, server, timeout_s=timeout_s)
    if not gate["ok"] or llm:
        return gate
    time.sleep(settle_s)  # a service that cannot start (no camera) exits within this
    service = t.op("status", root)["service"]
    gate["service"] = service.get("active")
    gate["service_backend"] = service.get("backend")
    if service.get("active") != "active" or service.get("state") == "failed":
        gate["ok"] = False
        gate["error"] = (
            f"the service did not stay up: {service.get('error') or service.get('active')}"
        )
    return gate


def health_summary(gate: dict[str, Any]) -> str:
    """One line on a passed health gate, for the steps table."""
    if gate.get("kind") == "llm":
        p = gate["probe"]
        if p["check"] == "probe":
            return (
                f"greedy probe {len(p['got_ids'])} ids after {p['prompt_tokens']} prompt tokens "
                f"match exactly, tokenizer ok ({p['seconds']:.1f} s); no service (llm bundle)"
            )
        return f"{p['note']}: {p['logits']} finite logits; no service (llm bundle)"
    enc, rtt = gate["encoder"], gate["round_trip"]
    return (
        f"probe on {enc['backend'].split(':')[0]} max diff {enc['max_diff_lsb']} LSB "
        f"(tol {enc['tolerance_lsb']}); round trip to {rtt['server']} {rtt['rtt_ms']:.1f} ms, "
        f"action {rtt['action']}; service {gate['service']}"
    )


def health_of_current(t: Transport, root: str) -> dict[str, Any]:
    """Run the health check of whatever release is current, with that release's own runtime."""
    return device_health(t, root, f"{root}/current/runtime/venv/bin/python", None)


def confirm(
    t: Transport,
    root: str,
    release: str,
    python: str,
    server: str | None,
    switched: dict[str, Any],
    steps: Steps,
    llm: bool = False,
) -> dict[str, Any]:
    """Gate the pending release and commit it, or revert it; the gate's result.

    Raises SplitedgeError once the device is back on what it ran before (or will be, by itself).
    """
    pending = switched["pending"]
    ends = time.monotonic() + float(pending["deadline_s"])
    before = switched["previous"]
    try:
        # the gate must end before the device's own deadline, with time left to say so
        budget = max(1.0, ends - time.monotonic() - 5.0)
        gate = health_gate(t, root, python, server, llm=llm, timeout_s=budget)
        if gate["ok"]:
            c = t.op("commit", root, id=pending["id"], why=health_summary(gate), timeout_s=60)
            gate["committed_at"] = c["transaction"].get("committed_at")
            return gate
    except KeyboardInterrupt:
        _revert(t, root, release, pending, before, "the flasher was interrupted (Ctrl-C)")
        raise SplitedgeError(
            f"interrupted after the switch: reverted {release}, current is {before or 'empty'}"
        ) from None
    except DeviceRefused as e:  # the commit came too late: the device had reverted already
        raise SplitedgeError(f"{e}") from e
    except SplitedgeError as e:  # ssh lost or timed out
        _revert(t, root, release, pending, before, f"the flasher lost the device: {e}")
        raise SplitedgeError(
            f"lost {t.target} during the health gate ({e}); reverted {release}, current is "
            f"{before or 'empty'}"
        ) from e
    if before == release:  # the same release again (new settings): the old settings come back
        back = _revert(
            t, root, release, pending, before, f"health gate failed: {gate.get('error')}"
        )
        raise SplitedgeError(
            f"health gate failed on {t.target}: {gate.get('error')}. Reverted automatically: "
            f"{release} runs with its previous settings again, {back['service']}"
        )
    back = _revert(t, root, release, pending, before, f"health gate failed: {gate.get('error')}")
    restored = back["current"]
    after = health_of_current(t, root) if restored else {"ok": None}
    steps.done(
        "rollback",
        f"to {restored or 'nothing (first flash)'}"
        + (
            f", its health {'ok' if after['ok'] else 'FAILED: ' + str(after.get('error'))}"
            if restored
            else ""
        ),
    )
    raise SplitedgeError(
        f"health gate failed on {t.target}: {gate.get('error')}. Rolled back automatically: "
        f"current is {restored or 'empty (this was the first flash)'}, {back['service']}"
    )


def _revert(
    t: Transport, root: str, release: str, pending: dict[str, Any], before: str | None, why: str
) -> dict[str, Any]:
    """Ask the device to revert now; when it cannot be reached, say when it reverts by itself."""
    try:
        return t.op("revert", root, id=pending["id"], why=why, timeout_s=30)
    except (SplitedgeError, KeyboardInterrupt) as e:
        raise SplitedgeError(
            f"{why}; could not reach {t.target} to revert ({e}). The device reverts {release} "
            f"to {before or 'nothing'} by itself at {pending['deadline_at']} (its commit "
            f"deadline); `splitedge status --host {t.target}` shows it"
        ) from None
