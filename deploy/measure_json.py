"""A measure sweep as plain data: the cells' names and the JSON `splitedge measure --json`
prints and `measure` stores (rows, real-time rows beside their sync twins, latencies)."""

from __future__ import annotations

import time
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING, Any

from deploy.link.profiles import get_profile

if TYPE_CHECKING:
    from deploy.measure import MeasureConfig, Sweep


def loop_of(c: Any) -> str:
    """The loop a cell ran (a cell stored before loops existed ran sync)."""
    return str(c.row().get("loop", "sync"))


def cell_key(c: Any) -> str:
    """The cell's name in latencies_ms: link/mode, with /xN for N > 1 clients, and /realtime
    for a real-time cell."""
    return (
        f"{c.link}/{c.mode}"
        + (f"/x{c.clients}" if c.clients > 1 else "")
        + ("/realtime" if loop_of(c) == "realtime" else "")
    )


def cells_to_json(sweep: Sweep, cfg: MeasureConfig) -> dict[str, Any]:
    """The sweep as plain data (config, backend, sync rows, real-time rows, per-step
    latencies); a real-time row carries the sync return of its link/mode when measured."""
    cfg_d = {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(cfg).items()}
    cells = sweep.cells
    sync = [c.row() for c in cells if loop_of(c) == "sync"]
    by = {(r["link"], r["mode"], r["clients"]): r for r in sync}
    realtime = []
    for row in (c.row() for c in cells if loop_of(c) == "realtime"):
        twin = by.get((row["link"], row["mode"], row["clients"]), {})
        realtime.append(
            {
                **row,
                "sync_return": twin.get("episode_return"),
                "sync_episodes": twin.get("episodes"),
            }
        )
    return {
        "config": cfg_d,
        "measured_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "link_backend": sweep.backend.name,
        "link_backend_reasons": sweep.backend.reasons,
        "notes": sweep.notes,
        "env": sweep.env,
        "encoder": cells[0].encoder if cells else "",
        "profiles": sweep.profiles
        or {p: asdict(get_profile(p, cfg.links_file)) for p in cfg.links},
        "control_hz": sweep.control_hz,
        "rows": sync,
        "realtime": realtime,
        "latencies_ms": {cell_key(c): c.latencies() for c in cells},
    }
