"""Fleets: one canary first, then the rest one at a time, stopping at the first failure.

A fleet file is TOML::

    [defaults]              # any flash option: profile, server, offline, source, sink, root...
    profile = "pi-4b"
    server = "10.0.0.5:50051"

    [[device]]
    host = "pi@cam-1.local"
    canary = true           # default: the first device

    [[device]]
    host = "pi@cam-2.local"
    profile = "pi-zero-2w"
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from splitedge.errors import SplitedgeError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

OVERRIDABLE = {
    "profile",
    "server",
    "root",
    "offline",
    "source",
    "sink",
    "device_python",
    "ssh_config",
}


@dataclass
class FleetDevice:
    """One device of a fleet and the flash options it overrides."""

    host: str
    canary: bool = False
    overrides: dict[str, Any] = field(default_factory=dict)


def load_fleet(path: Path) -> list[FleetDevice]:
    """Devices in flashing order: the canary first, the others in file order."""
    try:
        data = tomllib.loads(Path(path).read_text())
    except (OSError, tomllib.TOMLDecodeError) as e:
        raise SplitedgeError(f"cannot read fleet file {path}: {e}") from e
    defaults = data.get("defaults", {})
    entries = data.get("device", [])
    if not entries:
        raise SplitedgeError(f"{path} lists no [[device]] entries")
    devices = []
    for i, entry in enumerate(entries):
        if "host" not in entry:
            raise SplitedgeError(f"{path}: device #{i + 1} has no host")
        merged = {**defaults, **{k: v for k, v in entry.items() if k not in ("host", "canary")}}
        unknown = sorted(set(merged) - OVERRIDABLE)
        if unknown:
            raise SplitedgeError(f"{path}: unknown keys {unknown}; allowed: {sorted(OVERRIDABLE)}")
        if "ssh_config" in merged:
            merged["ssh_config"] = Path(merged["ssh_config"])
        devices.append(
            FleetDevice(host=entry["host"], canary=bool(entry.get("canary")), overrides=merged)
        )
    canaries = [d for d in devices if d.canary]
    if len(canaries) > 1:
        raise SplitedgeError(f"{path}: {len(canaries)} devices say canary = true; mark one")
    canary = canaries[0] if canaries else devices[0]
    canary.canary = True
    return [canary] + [d for d in devices if d is not canary]


def flash_fleet(
    devices: list[FleetDevice],
    flash_one: Callable[[FleetDevice], dict[str, Any]],
    log: Callable[[str], None] = lambda s: None,
) -> dict[str, Any]:
    """Flash devices in order; after the first failure the rest are skipped, untouched."""
    rows: list[dict[str, Any]] = []
    failed: str | None = None
    for d in devices:
        role = "canary" if d.canary else "device"
        if failed:
            rows.append(
                {
                    "host": d.host,
                    "role": role,
                    "result": "skipped",
                    "detail": f"stopped after {failed} failed",
                }
            )
            continue
        log(f"[{role}] {d.host}")
        try:
            r = flash_one(d)
            rows.append(
                {
                    "host": d.host,
                    "role": role,
                    "result": "ok",
                    "detail": f"{r['release']} is current",
                }
            )
        except SplitedgeError as e:
            failed = d.host
            rows.append({"host": d.host, "role": role, "result": "FAILED", "detail": str(e)})
    ok = failed is None
    done = sum(r["result"] == "ok" for r in rows)
    return {
        "ok": ok,
        "devices": rows,
        "summary": f"{done}/{len(rows)} flashed" + ("" if ok else f", stopped at {failed}"),
    }
