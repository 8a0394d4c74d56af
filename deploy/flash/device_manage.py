"""Device side: the releases on a device (list, prune) and its logs. Stdlib only, like remote.py.

A release's state: current, previous, pending (switched, not yet confirmed), reverted
(the device went back from it), or kept (staged, not in use). Prune never removes the
current or the previous release, nor what a pending switch would go back to; it also
drops runtimes no release uses and unfinished transfers.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
from pathlib import Path
from typing import Any

from deploy.flash.device_base import UNIT_PATH, Refused, can_manage_systemd, link_name, read_json
from deploy.flash.device_commit import transaction


def _size(path: Path) -> int:
    """Bytes under path, not following symlinks (a release's runtime link is not its size)."""
    total = 0
    for p in path.rglob("*"):
        if p.is_file() and not p.is_symlink():
            total += p.stat().st_size
    return total


def _reverted(root: Path) -> dict[str, str]:
    """release -> when and why the device last went back from it (history.jsonl)."""
    out: dict[str, str] = {}
    try:
        lines = (root / "state" / "history.jsonl").read_text().splitlines()
    except OSError:
        return out
    for line in lines:
        try:
            e = json.loads(line)
        except ValueError:
            continue
        if e.get("event") == "revert" and e.get("from"):
            out[e["from"]] = f"reverted at {e['at']}: {e.get('why', '')}"
        elif e.get("event") in ("flash", "commit", "rollback") and e.get("to") in out:
            out.pop(e["to"])  # in use again since
    return out


def releases(root: Path) -> list[dict[str, Any]]:
    """Every release on the device, newest first: version, bundle digest, date, size, state."""
    folder = root / "releases"
    if not folder.is_dir():
        return []
    cur, prev = link_name(root / "current"), link_name(root / "previous")
    txn = transaction(root) or {}
    pending = txn.get("release") if txn.get("state") == "pending" else None
    reverted = _reverted(root)
    rows = []
    for rel in folder.iterdir():
        if not rel.is_dir():
            continue
        info = read_json(rel / "release.json") or {}
        manifest = rel / "bundle" / "manifest.json"
        digest = (
            hashlib.sha256(manifest.read_bytes()).hexdigest()[:12] if manifest.is_file() else ""
        )
        state = (
            "pending"
            if rel.name == pending
            else "current"
            if rel.name == cur
            else "previous"
            if rel.name == prev
            else reverted.get(rel.name, "kept")
        )
        rows.append(
            {
                "release": rel.name,
                "version": info.get("version", "?"),
                "kind": info.get("kind", "policy"),
                "digest": digest,
                "flashed_at": info.get("flashed_at", ""),
                "size_mb": round(_size(rel) / 2**20, 2),
                "runtime": Path(str(_readlink(rel / "runtime"))).name or None,
                "state": state,
            }
        )
    return sorted(rows, key=lambda r: (r["flashed_at"], r["release"]), reverse=True)


def _readlink(p: Path) -> str:
    try:
        return str(p.readlink())
    except OSError:
        return ""


def prune(root: Path, keep: int) -> dict[str, Any]:
    """Remove all but the newest `keep` releases (never current, previous or a pending switch's
    way back), runtimes no release uses, and unfinished transfers in incoming/."""
    if keep < 0:
        raise Refused(f"--keep {keep}: give 0 or more releases to keep")
    txn = transaction(root) or {}
    if txn.get("state") == "pending":
        raise Refused(
            f"{txn['release']} is pending (a flash is in progress or was interrupted); prune "
            f"after it is committed or reverted (at {txn['deadline_at']} at the latest)"
        )
    protected = {link_name(root / "current"), link_name(root / "previous")}
    rows = releases(root)
    kept = [r["release"] for r in rows if r["release"] in protected]
    others = [r for r in rows if r["release"] not in protected]
    kept += [r["release"] for r in others[:keep]]
    removed, freed = [], 0
    for r in others[keep:]:
        path = root / "releases" / r["release"]
        freed += _size(path)
        shutil.rmtree(path)
        removed.append(r["release"])
    used = {Path(_readlink(root / "releases" / k / "runtime")).name for k in kept}
    runtimes = []
    for rt in sorted((root / "runtimes").iterdir()) if (root / "runtimes").is_dir() else []:
        if rt.name not in used:
            freed += _size(rt)
            shutil.rmtree(rt)
            runtimes.append(rt.name)
    incoming = []
    for inc in sorted((root / "incoming").iterdir()) if (root / "incoming").is_dir() else []:
        freed += _size(inc)
        shutil.rmtree(inc)
        incoming.append(inc.name)
    return {
        "ok": True,
        "kept": kept,
        "removed": removed,
        "runtimes_removed": runtimes,
        "incoming_removed": incoming,
        "freed_mb": round(freed / 2**20, 2),
    }


def logs(root: Path, lines: int) -> dict[str, Any]:
    """The service's last lines (timestamped) and the device's last release events."""
    text: list[str] = []
    path = root / "run" / "service.log"
    source = f"{path} (none yet)"
    if can_manage_systemd()[0] and UNIT_PATH.is_file():
        source = "journalctl -u splitedge.service"
        argv = ["journalctl", "-u", "splitedge.service", "-n", str(lines), "-o", "short-iso"]
        r = subprocess.run([*argv, "--no-pager"], capture_output=True, text=True)
        text = r.stdout.splitlines()
    elif path.is_file():
        source = str(path)
        with open(path, "rb") as f:
            f.seek(0, 2)
            f.seek(max(0, f.tell() - 256 * lines))
            text = f.read().decode(errors="replace").splitlines()[-lines:]
    try:
        events = (root / "state" / "history.jsonl").read_text().splitlines()[-lines:]
    except OSError:
        events = []
    watchdog = root / "run" / "commit-watchdog.log"
    return {
        "ok": True,
        "source": source,
        "lines": text,
        "events": [json.loads(e) for e in events if e.strip()],
        "watchdog": watchdog.read_text().splitlines()[-lines:] if watchdog.is_file() else [],
    }
