"""`splitedge flash --reconfigure`: new device settings, no new bundle, same commit safety.

The device's settings (server, backend, token, source, sink, rate: etc/device.json)
change as one pending transaction on the current release: the service restarts with
them, the health gate runs, and unless this side confirms it within the commit
deadline the device puts the old settings back by itself, as for a flash.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

from deploy.flash import preflight
from deploy.flash.flasher import FlashOptions, Log
from deploy.flash.gate import confirm, health_summary
from deploy.flash.transport import Transport
from splitedge.errors import SplitedgeError


def check_server(text: str) -> str:
    """HOST:PORT (IPv6 in brackets), or say what is expected."""
    host, _, port = text.rpartition(":")
    if not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise SplitedgeError(
            f"--server {text!r} is not HOST:PORT (e.g. 192.168.1.20:50051 or [fe80::1]:50051)"
        )
    return text


def send_token(t: Transport, root: str, token_file: Path) -> str:
    """Copy a bearer token file to <root>/etc/token (mode 0600); its path on the device."""
    try:
        token = token_file.expanduser().read_text().strip()
    except OSError as e:
        raise SplitedgeError(
            f"--token-file {token_file}: {e.strerror}; give the device's token file from "
            "`splitedge certs` (certs/devices/<id>.token)"
        ) from e
    if not token:
        raise SplitedgeError(
            f"--token-file {token_file} is empty; reissue it with `splitedge certs`"
        )
    with tempfile.TemporaryDirectory(prefix="splitedge-token-") as tmp:
        fd = os.open(Path(tmp) / "token", os.O_WRONLY | os.O_CREAT, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(token + "\n")
        t.copy(Path(tmp), f"{root}/etc")
    return f"{root}/etc/token"


def reconfigure(
    opts: FlashOptions, changes: dict[str, Any], token_file: Path | None, log: Log
) -> dict[str, Any]:
    """Change the current release's device settings under the commit model; the report."""
    from deploy.flash.flasher import _Steps

    steps = _Steps(log)
    t = opts.transport()
    if "server" in changes:
        check_server(changes["server"])
    if "backend" in changes:
        preflight.check_backend(changes["backend"], opts.profile)
    if not changes and token_file is None:
        raise SplitedgeError(
            "--reconfigure changes nothing: give --server, --backend, --token-file, --source, "
            "--sink or --rate-hz"
        )
    facts = t.op("facts", opts.root, timeout_s=60)
    root, current = facts["root"], facts["current"]
    if not current:
        raise SplitedgeError(f"{t.target} has no current release to reconfigure; flash a bundle")
    if facts.get("pending"):
        p = facts["pending"]
        raise SplitedgeError(
            f"{p['release']} is pending on {t.target} until {p['deadline_at']}; wait for it to "
            "be reverted, or run `splitedge rollback`, then reconfigure"
        )
    status = t.op("status", root, timeout_s=60)
    if status.get("kind") == "llm":
        raise SplitedgeError(f"{current} is an llm release: it has no service settings to change")
    old = dict(status.get("config") or {})
    new = {**old, **changes}
    if "backend" in changes:
        backend, why, _, problem = preflight.resolve_backend(
            changes["backend"], opts.profile, facts
        )
        if problem:
            raise SplitedgeError(f"pre-flight failed on {t.target}, nothing was changed: {problem}")
        new.update(backend=backend, backend_reason=why)
    if token_file is not None:
        new["token_file"] = send_token(t, root, token_file)
    changed = sorted(k for k in new if new.get(k) != old.get(k))
    steps.done("pre-flight", f"{current} on {t.target}; changing {', '.join(changed) or 'nothing'}")
    switched = t.op(
        "switch",
        root,
        release=current,
        deadline=opts.commit_deadline_s,
        reason="reconfigure",
        config=json.dumps(new),
    )
    steps.done(
        "switch",
        f"new settings for {current}, pending: the device restores the old ones by itself at "
        f"{switched['pending']['deadline_at']} unless the gate confirms; {switched['service']}",
    )
    python = f"{root}/current/runtime/venv/bin/python"
    gate = confirm(t, root, current, python, new.get("server"), switched, steps)
    steps.done("health", health_summary(gate))
    steps.done("commit", f"settings committed at {gate.get('committed_at')}")
    return {
        "host": str(t.target),
        "release": current,
        "changed": {k: {"from": old.get(k), "to": new.get(k)} for k in changed},
        "steps": steps.rows,
        "health": gate,
        "ok": True,
    }
