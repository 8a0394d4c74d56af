"""Decision latency of a split policy vs raw offload over emulated links, closed loop.

For each (link, mode) cell: a LinkProxy shapes the path between a fresh edge
client and one policy server process; the edge loop runs `steps` decisions
after a warm-up; the proxy's byte counters give the bytes that really crossed
the link, and the analytic bound is what an ideal link and zero software
overhead would give: 2 x one-way delay + serialisation both ways at the
link's rates + measured encode + measured server compute.
"""

from __future__ import annotations

import itertools
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from deploy.link.profiles import LinkProfile, bound_ms, get_profile
from deploy.link.proxy import LinkProxy
from deploy.server_process import ServerProcess
from edge.agent import run_loop
from edge.client import MODES, ClientConfig, PolicyClient
from edge.telemetry import StepRecord, summarise
from splitedge.bundle import Bundle, load_bundle
from splitedge.errors import SplitedgeError


@dataclass
class MeasureConfig:
    """One measurement sweep: links x modes, `steps` decisions per cell."""

    bundle: Path
    links: list[str]
    modes: list[str] = field(default_factory=lambda: ["split", "raw"])
    steps: int = 100
    warmup: int = 5
    backend: str = "auto"
    rpc: str = "stream"
    deadline_s: float = 10.0
    seed: int = 0

    def __post_init__(self) -> None:
        bad = [m for m in self.modes if m not in MODES]
        if bad:
            raise SplitedgeError(
                f"unknown mode(s) {', '.join(bad)}; choose from {', '.join(MODES)}"
            )
        if self.steps < 1 or self.warmup < 0:
            raise SplitedgeError(
                f"--steps must be >= 1 and warm-up >= 0 (got {self.steps}, {self.warmup})"
            )
        if not self.links:
            raise SplitedgeError("no links given; name some with --links (see deploy/links.toml)")


@dataclass
class Cell:
    """The result of one (link, mode) cell."""

    link: str
    mode: str
    summary: dict[str, Any]
    wire_up: float  # bytes per step through the link, HTTP/2 framing included
    wire_down: float
    bound_ms: float
    records: list[StepRecord]
    encoder: str

    def row(self) -> dict[str, Any]:
        s = self.summary
        return {
            "link": self.link,
            "mode": self.mode,
            "p50_ms": s["p50_ms"],
            "p95_ms": s["p95_ms"],
            "p99_ms": s["p99_ms"],
            "bound_ms": self.bound_ms,
            "p50_minus_bound_ms": s["p50_ms"] - self.bound_ms,
            "up_B": self.wire_up,
            "down_B": self.wire_down,
            "msg_up_B": s["bytes_up"],
            "msg_down_B": s["bytes_down"],
            "encode_ms": s["encode_ms"],
            "server_ms": s["server_compute_ms"],
            "fallbacks": s["fallbacks"],
            "steps": s["steps"],
        }


def measure_cell(
    bundle: Bundle,
    server: str,
    profile: LinkProfile,
    mode: str,
    cfg: MeasureConfig,
    on_step: Callable[[int], None] | None = None,
) -> Cell:
    """Run one cell through a fresh link proxy and client."""
    host, port = server.rsplit(":", 1)
    with LinkProxy(profile, upstream=(host, int(port))) as link:
        client = PolicyClient(
            bundle,
            ClientConfig(
                server=link.address,
                mode=mode,
                backend=cfg.backend,
                rpc=cfg.rpc,
                deadline_s=cfg.deadline_s,
            ),
        )
        with client.connect():
            if cfg.warmup:
                run_loop(client, cfg.warmup, seed=cfg.seed + 999)
            before = link.stats()
            snapshots = [before]

            def snapshot(i: int) -> None:
                snapshots.append(link.stats())
                if on_step is not None:
                    on_step(i)

            result = run_loop(client, cfg.steps, seed=cfg.seed, on_step=snapshot)
            after = link.stats()
    failed = [r.error for r in result.records if r.fallback]
    if len(failed) == cfg.steps:
        causes = "; ".join(f"{n}x {e}" for e, n in Counter(failed).most_common(2))
        raise SplitedgeError(
            f"{profile.name}/{mode}: every decision fell back ({causes}); "
            "is the server healthy and --deadline-ms long enough for this link?"
        )
    up = (after["bytes_up"] - before["bytes_up"]) / cfg.steps
    down = (after["bytes_down"] - before["bytes_down"]) / cfg.steps
    summary = summarise(result.records)
    # The bound uses the median step's bytes: keepalive and BDP pings add bytes on some steps
    # that travel off the critical path, and on a 20 kbit/s link their mean would cost ~10 ms.
    med_up, med_down = (
        float(np.median([b[k] - a[k] for a, b in itertools.pairwise(snapshots)]))
        for k in ("bytes_up", "bytes_down")
    )
    bound = (
        bound_ms(profile, med_up, med_down) + summary["encode_ms"] + summary["server_compute_ms"]
    )
    return Cell(
        profile.name,
        mode,
        summary,
        up,
        down,
        bound,
        result.records,
        client.encoder_reason or "none (raw mode)",
    )


def measure(cfg: MeasureConfig, progress: bool = True) -> list[Cell]:
    """Run every (link, mode) cell against one policy server process."""
    bundle = load_bundle(cfg.bundle)
    profiles = [get_profile(name) for name in cfg.links]
    cells: list[Cell] = []
    bar = _progress(len(profiles) * len(cfg.modes) * cfg.steps, progress)
    with ServerProcess(bundle.root) as server:
        for profile in profiles:
            for mode in cfg.modes:
                bar.set_description(f"{profile.name}/{mode}")
                cells.append(
                    measure_cell(
                        bundle, server.address, profile, mode, cfg, on_step=lambda _: bar.update(1)
                    )
                )
    bar.close()
    return cells


def _progress(total: int, enabled: bool) -> Any:
    from tqdm import tqdm

    return tqdm(total=total, unit="step", disable=not enabled, leave=False, dynamic_ncols=True)


def cells_to_json(cells: list[Cell], cfg: MeasureConfig) -> dict[str, Any]:
    """The sweep as plain data (config, rows, per-step latencies)."""
    cfg_d = {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(cfg).items()}
    return {
        "config": cfg_d,
        "measured_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "encoder": cells[0].encoder if cells else "",
        "rows": [c.row() for c in cells],
        "latencies_ms": {
            f"{c.link}/{c.mode}": [r.total_ms for r in c.records if not r.fallback] for c in cells
        },
    }
