"""Device side: a switched release is *pending* until the flasher confirms its health gate.

Mender's commit model, owned by the device. `begin` records the transaction in
state/commit.json and forks a watchdog (a detached process, started before the
links move); unless `commit` arrives with the transaction's id before the
deadline, the watchdog puts the previous release back, restarts its service and
checks it, by itself: whatever happens to the flasher or the network after the
switch, no unchecked release stays live. state/commit.json keeps the latest
transaction: pending, committed or reverted, with times and the reason.
Stdlib only, like remote.py.
"""

from __future__ import annotations

import fcntl
import json
import os
import secrets
import subprocess
import sys
import time
import traceback
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from deploy.flash.device_base import (
    Refused,
    history,
    link_name,
    now_iso,
    point,
    read_json,
    restart_service,
    service_state,
    stop_service,
    write_json,
)

DEFAULT_DEADLINE_S = 120.0


def _path(root: Path) -> Path:
    return root / "state" / "commit.json"


def _config_path(root: Path) -> Path:
    return root / "etc" / "device.json"


def transaction(root: Path) -> dict[str, Any] | None:
    """The latest release transaction (pending, committed or reverted), or None."""
    return read_json(_path(root))


@contextmanager
def _locked(root: Path) -> Iterator[None]:
    """One transaction change at a time (flasher ops and the watchdog)."""
    (root / "state").mkdir(parents=True, exist_ok=True)
    with open(root / "state" / ".commit.lock", "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _start_time(pid: int) -> str | None:
    """A live process's start time (with its pid, an identity that survives pid reuse)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return None if fields[0] in ("Z", "X") else fields[19]  # a zombie is dead


def _watchdog_alive(txn: dict[str, Any]) -> bool:
    w = txn.get("watchdog") or {}
    start = w.get("start")  # None: it was gone before its identity could be read
    return bool(w.get("pid")) and start is not None and _start_time(int(w["pid"])) == start


def begin(
    root: Path,
    release: str,
    deadline_s: float,
    reason: str = "flash",
    config: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Switch to release (and, given config, to new device settings in etc/device.json) as a
    pending transaction, watched by a detached timer started first."""
    if not (root / "releases" / release / "runtime").exists():
        raise Refused(f"release {release} is not staged with a runtime; flash it again")
    if not 0 < deadline_s <= 86400:
        raise Refused(f"commit deadline {deadline_s} s is outside 0..86400 s")
    with _locked(root):
        _settle(root)
        old = transaction(root)
        if old and old["state"] == "pending":
            raise Refused(
                f"{old['release']} is pending on the device since {old['started_at']} (was its "
                f"flash interrupted?); the device reverts it by itself at {old['deadline_at']} "
                "unless confirmed: wait for that, or run `splitedge rollback` to revert it now"
            )
        cur, prev = link_name(root / "current"), link_name(root / "previous")
        t0 = time.time()
        txn: dict[str, Any] = {
            "id": secrets.token_hex(8),
            "state": "pending",
            "reason": reason,
            "release": release,
            "from": cur,
            "previous_before": prev,
            "started_at": now_iso(t0),
            "deadline_s": deadline_s,
            "deadline_at": now_iso(t0 + deadline_s),
            "deadline_epoch": t0 + deadline_s,
        }
        if config is not None:
            txn["config_before"] = read_json(_config_path(root))
            txn["config"] = config
        write_json(_path(root), txn)
        txn["watchdog"] = _start_watchdog(root, txn["id"], deadline_s)
        write_json(_path(root), txn)
        if config is not None:
            write_json(_config_path(root), config)
        point(root, release, cur if cur and cur != release else prev)
        history(root, {"event": reason, "from": cur, "to": release, "pending": txn["id"]})
        service = restart_service(root)
    return {
        "ok": True,
        "previous": cur,
        "current": release,
        "service": service,
        "pending": {k: txn[k] for k in ("id", "deadline_s", "deadline_at", "watchdog")},
    }


def commit(root: Path, txn_id: str, health: str = "") -> dict[str, Any]:
    """The flasher saw the health gate pass: the pending release stays."""
    with _locked(root):
        txn = transaction(root)
        if not txn or txn.get("id") != txn_id:
            raise Refused(
                f"no transaction {txn_id} on the device (another flash or rollback replaced it); "
                "`splitedge status` shows what is current"
            )
        if txn["state"] == "reverted":
            raise Refused(
                f"too late: the device reverted {txn['release']} at {txn['reverted_at']} "
                f"({txn['why']}); current is {txn['from'] or 'empty'}. Flash again, with a "
                "longer --commit-deadline if the health gate needs more time"
            )
        if txn["state"] == "pending":
            txn.update(state="committed", committed_at=now_iso(), health=health)
            write_json(_path(root), txn)
            history(root, {"event": "commit", "from": txn["from"], "to": txn["release"]})
    return {"ok": True, "transaction": txn}


def revert(root: Path, txn_id: str, why: str, by: str = "flasher") -> dict[str, Any]:
    """Put back what was current before the pending release (idempotent)."""
    with _locked(root):
        txn = transaction(root)
        if not txn or (txn_id and txn.get("id") != txn_id):
            raise Refused(f"no transaction {txn_id} on the device to revert")
        if txn["state"] == "committed":
            raise Refused(
                f"{txn['release']} was committed at {txn['committed_at']}; "
                "use `splitedge rollback` to leave it"
            )
        if txn["state"] == "pending":
            _revert_locked(root, txn, why, by)
    return {
        "ok": True,
        "current": txn["from"],
        "previous": link_name(root / "previous"),
        "rolled_back_from": txn["release"],
        "service": txn.get("service", ""),
        "transaction": txn,
    }


def _revert_locked(
    root: Path, txn: dict[str, Any], why: str, by: str, at_boot: bool = False
) -> None:
    """Links, settings and service back as they were before txn. At boot the service manager is
    starting the service itself (this runs before it), so only the links and settings move."""
    before = txn["from"]
    if "config" in txn:  # the device settings as they were
        if txn["config_before"] is None:
            _config_path(root).unlink(missing_ok=True)
        else:
            write_json(_config_path(root), txn["config_before"])
    if before and (root / "releases" / before).is_dir():
        point(root, before, txn["previous_before"])
        service = "boot: started by the service manager" if at_boot else restart_service(root)
    else:  # a first flash (or its predecessor vanished): nothing to go back to but nothing
        service = "boot: nothing to start" if at_boot else stop_service(root)
        point(root, None, txn["previous_before"])
    txn.update(
        state="reverted",
        reverted_at=now_iso(),
        reverted_epoch=time.time(),
        why=why,
        by=by,
        service=service,
    )
    write_json(_path(root), txn)
    history(root, {"event": "revert", "from": txn["release"], "to": before, "why": why, "by": by})


def _settle(root: Path) -> None:
    """A pending transaction whose watchdog is gone (the device restarted) reverts now."""
    txn = transaction(root)
    if txn and txn["state"] == "pending" and not _watchdog_alive(txn):
        _revert_locked(
            root,
            txn,
            f"its watchdog was gone (device restarted?) while {txn['release']} was pending; "
            "reverted at the next contact",
            "device",
        )


def settle_at_boot(root: Path) -> dict[str, Any]:
    """Before the service starts at boot (the unit's ExecStartPre): a release still pending lost
    its watchdog with the restart, so the previous release goes back before anything unchecked
    runs; the service manager then starts whatever is current. ok is False when nothing is left
    to start (a first flash was pending), so the unit does not start."""
    with _locked(root):
        txn = transaction(root)
        if not (txn and txn["state"] == "pending" and not _watchdog_alive(txn)):
            return {"ok": True, "reverted": False, "current": link_name(root / "current")}
        _revert_locked(
            root,
            txn,
            f"the device restarted while {txn['release']} was pending; reverted at boot",
            "device at boot",
            at_boot=True,
        )
    current = link_name(root / "current")
    return {"ok": current is not None, "reverted": True, "current": current, "transaction": txn}


def settle(root: Path) -> None:
    """_settle under the lock, for ops that only read (facts, status)."""
    with _locked(root):
        _settle(root)


def rollback(root: Path, to: str = "") -> dict[str, Any]:
    """By hand: a pending release reverts; otherwise switch to previous (or --to), committed."""
    txn = transaction(root)
    if txn and txn["state"] == "pending" and not to:
        r = revert(root, txn["id"], "rolled back by hand (splitedge rollback)", "operator")
        return r
    with _locked(root):
        _settle(root)
        txn = transaction(root)
        if txn and txn["state"] == "pending":
            raise Refused(
                f"{txn['release']} is pending; run `splitedge rollback` without --to first"
            )
        cur, prev = link_name(root / "current"), link_name(root / "previous")
        target = resolve_release(root, to) if to else prev
        if not target:
            raise Refused("no previous release on the device to roll back to")
        if not (root / "releases" / target / "runtime").exists():
            raise Refused(f"release {target} has no runtime on the device; flash it again")
        point(root, target, cur if cur and cur != target else prev)
        history(root, {"event": "rollback", "from": cur, "to": target})
        service = restart_service(root)
        stamp = now_iso()
        write_json(
            _path(root),
            {
                "id": secrets.token_hex(8),
                "state": "committed",
                "reason": "rollback",
                "release": target,
                "from": cur,
                "previous_before": prev,
                "started_at": stamp,
                "committed_at": stamp,
                "health": "rolled back by hand",
            },
        )
    return {
        "ok": True,
        "current": target,
        "previous": link_name(root / "previous"),
        "rolled_back_from": cur,
        "service": service,
    }


def resolve_release(root: Path, name: str) -> str:
    """A release folder by its name (cartpole-ppo-1.0.0) or its version (1.0.0), if unique."""
    releases = root / "releases"
    if (releases / name).is_dir():
        return name
    found = (
        sorted(p.name for p in releases.glob(f"*-{name}") if p.is_dir())
        if releases.is_dir()
        else []
    )
    if len(found) == 1:
        return found[0]
    if not found:
        known = sorted(p.name for p in releases.iterdir()) if releases.is_dir() else []
        raise Refused(f"no release {name!r} on the device; it has: {', '.join(known) or 'none'}")
    raise Refused(f"version {name!r} matches {', '.join(found)}; give the full release name")


# -- the watchdog ---------------------------------------------------------------------------
def _start_watchdog(root: Path, txn_id: str, deadline_s: float) -> dict[str, Any]:
    """Fork a detached process (double fork, own session, no ssh pipes) that runs watch()."""
    read_end, write_end = os.pipe()
    first = os.fork()
    if first == 0:  # pragma: no cover - runs in the children
        try:
            os.setsid()
            if os.fork() == 0:
                os.write(write_end, str(os.getpid()).encode())
                _detach(root)
                watch(root, txn_id, time.monotonic() + deadline_s)
        except BaseException:
            traceback.print_exc()  # into the watchdog's log
        finally:
            os._exit(0)
    os.close(write_end)
    os.waitpid(first, 0)
    pid = int(os.read(read_end, 32) or 0)
    os.close(read_end)
    if not pid:
        raise Refused("could not start the commit watchdog")
    return {"pid": pid, "start": _start_time(pid), "kind": "forked process"}


def _detach(root: Path) -> None:
    """No inherited descriptors: ssh must see the session end, the lock must not be shared."""
    (root / "run").mkdir(parents=True, exist_ok=True)
    log = os.open(str(root / "run" / "commit-watchdog.log"), os.O_WRONLY | os.O_CREAT | os.O_APPEND)
    null = os.open(os.devnull, os.O_RDONLY)
    os.dup2(null, 0)
    os.dup2(log, 1)
    os.dup2(log, 2)
    os.closerange(3, 1024)
    sys.stdout = sys.stderr = open(1, "w", buffering=1, closefd=False)  # noqa: SIM115


def watch(root: Path, txn_id: str, deadline: float) -> None:
    """Wait for the commit; at the deadline revert, restart and check the restored release."""
    seen = False  # started before begin() writes the transaction: wait to see it first
    while time.monotonic() < deadline:
        txn = transaction(root)
        mine = bool(txn) and txn.get("id") == txn_id
        if (mine and txn["state"] != "pending") or (seen and not mine):
            return  # committed, reverted by the flasher, or replaced
        seen = seen or mine
        time.sleep(min(0.25, max(0.01, deadline - time.monotonic())))
    txn = transaction(root) or {}
    why = (
        f"not confirmed within {txn.get('deadline_s', 0):g} s: the flasher never reported a "
        "passed health gate (killed, disconnected, or the gate took too long)"
    )
    try:
        r = revert(root, txn_id, why, "device watchdog")
    except Refused:
        return  # committed at the last moment
    print(f"{now_iso()} reverted {r['rolled_back_from']} -> {r['current']}: {why}", flush=True)
    if r["current"]:
        _check_restored(root, txn_id)


def _check_restored(root: Path, txn_id: str) -> None:
    """The device's own check of the release it went back to (no server needed), recorded."""
    python = root / "current" / "runtime" / "venv" / "bin" / "python"
    argv = [str(python), "-m", "edge.service", "health", "--release", str(root / "current")]
    health: dict[str, Any]
    try:
        r = subprocess.run([*argv, "--local"], capture_output=True, text=True, timeout=300)
        lines = [ln for ln in r.stdout.splitlines() if ln.startswith("{")]
        health = json.loads(lines[-1]) if lines else {"ok": False, "error": r.stderr[-300:]}
    except (OSError, subprocess.TimeoutExpired, ValueError) as e:
        health = {"ok": False, "error": str(e)}
    service = service_state(root)
    with _locked(root):
        txn = transaction(root)
        if txn and txn.get("id") == txn_id:
            txn["restored"] = {
                "release": link_name(root / "current"),
                "checked_at": now_iso(),
                "ok": bool(health.get("ok")),
                "error": health.get("error"),
                "backend": (health.get("encoder") or {}).get("backend"),
                "service": service.get("active"),
            }
            write_json(_path(root), txn)
