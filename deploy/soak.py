"""Sustained load: one edge loop for M minutes over a shaped link, with device telemetry.

The edge process samples its own CPU % and RSS and the machine's temperatures and
throttling every interval (edge.sysmon). The report cuts the run into equal windows and
says whether frame rate (decisions/s), latency or RSS drift: the least-squares slope over
the run, and the change from the first window to the last, against a tolerance.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from deploy.clients import ClientGroup, ClientResult
from deploy.link.kernel import choose_backend, open_link
from deploy.link.profiles import get_profile
from deploy.measure import MeasureConfig, shaped_server
from deploy.measure_checks import check_env, check_links
from edge.telemetry import WindowedLatency
from splitedge.bundle import load_bundle
from splitedge.errors import SplitedgeError

DRIFT_TOLERANCE = 0.10  # a metric drifts when its last window differs from its first by > 10%


@dataclass
class SoakConfig:
    """One soak run."""

    bundle: Path
    minutes: float
    link: str = "wifi"
    mode: str = "split"
    link_backend: str = "auto"
    backend: str = "auto"  # encoder backend
    interval_s: float = 0.5
    windows: int = 6
    deadline_s: float = 10.0
    seed: int = 0
    env: str | None = None  # id or entry point; None: the bundle's recorded env or task
    env_kwargs: dict[str, Any] | None = None  # None: the bundle's recorded kwargs

    def __post_init__(self) -> None:
        if not self.minutes > 0:
            raise SplitedgeError(f"--minutes must be > 0, got {self.minutes}")
        if not self.interval_s > 0:
            raise SplitedgeError(f"--interval must be > 0 s, got {self.interval_s}")
        if self.windows < 2:
            raise SplitedgeError(f"--windows must be >= 2 to compare, got {self.windows}")


def soak(cfg: SoakConfig, on_step: Any = None) -> dict[str, Any]:
    """Run the loop for cfg.minutes; returns windows, drift verdicts and the raw samples."""
    check_links(MeasureConfig(bundle=cfg.bundle, links=[cfg.link], modes=[cfg.mode]))
    env = check_env(cfg.bundle, cfg.env, cfg.env_kwargs)
    choice = choose_backend(cfg.link_backend)
    profile = get_profile(cfg.link)
    notes: list[str] = []
    job = {
        "bundle": str(cfg.bundle), "mode": cfg.mode, "backend": cfg.backend,
        "deadline_s": cfg.deadline_s, "warmup": 5, "seed": cfg.seed,
        "duration_s": cfg.minutes * 60, "sysmon_s": cfg.interval_s, "windows": cfg.windows,
        "env": cfg.env, "env_kwargs": cfg.env_kwargs,
    }  # fmt: skip
    with shaped_server(load_bundle(cfg.bundle).root, choice, notes) as (server, pair):
        host, port = server.address.rsplit(":", 1)
        with open_link(choice.name, profile, (host, int(port)), pair, cfg.seed) as link:
            job.update(server=link.address, netns=link.netns)
            with ClientGroup(1, job) as group:
                group.go()
                (result,) = group.wait(cfg.minutes * 60 + cfg.deadline_s + 120, on_step)
    doc = analyse(result, cfg.windows)
    doc.update(
        config={k: str(v) if isinstance(v, Path) else v for k, v in asdict(cfg).items()},
        measured_at=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        link_backend=choice.name,
        link_backend_reasons=choice.reasons,
        notes=notes,
        encoder=result.encoder,
        env=env,
    )
    return doc


def slope_per_min(t_s: np.ndarray, y: np.ndarray) -> float:
    """Least-squares slope of y against time, per minute (nan with fewer than 2 points)."""
    ok = np.isfinite(y)
    if ok.sum() < 2 or np.ptp(t_s[ok]) == 0:
        return float("nan")
    return float(np.polyfit(t_s[ok] / 60.0, y[ok], 1)[0])


def latency_windows(result: ClientResult, windows: int) -> list[dict[str, Any]]:
    """The worker's per-window latency stats, or the same computed from kept records."""
    if "windows" in result.extra:
        return list(result.extra["windows"])
    acc = WindowedLatency(result.seconds / windows, windows)
    for t, r in zip(result.extra.get("t_s", []), result.records, strict=True):
        acc.add(t, r.total_ms, r.fallback)
    return acc.finish(result.seconds)


def analyse(result: ClientResult, windows: int) -> dict[str, Any]:
    """Per-window frame rate, latency, CPU, RSS, temperature; drift of each over the run."""
    samples = result.extra.get("sysmon", [])
    st = np.asarray([s["t_s"] for s in samples], dtype=float)
    rss = np.asarray([s["rss_mb"] for s in samples], dtype=float)
    cpu = np.asarray([s["cpu_pct"] for s in samples], dtype=float)
    temp = np.asarray([max(s["temps_c"].values(), default=np.nan) for s in samples], dtype=float)
    throttled = [s["throttled"] for s in samples if s.get("throttled")]
    rows, lat_windows = [], latency_windows(result, windows)
    for w in lat_windows:
        sm = (st >= w["from_s"]) & (st < w["to_s"])
        rows.append(
            {
                **{k: w[k] for k in ("from_s", "to_s", "decisions_s", "p50_ms", "p95_ms")},
                "fallbacks": int(w["fallbacks"]),
                "cpu_pct": float(cpu[sm].mean()) if sm.any() else float("nan"),
                "rss_mb": float(rss[sm].mean()) if sm.any() else float("nan"),
                "temp_c": float(np.nanmax(temp[sm])) if sm.any() and np.isfinite(temp[sm]).any()
                else float("nan"),
            }
        )  # fmt: skip
    edges = np.asarray([rows[0]["from_s"]] + [r["to_s"] for r in rows])
    drift = []
    for key in ("decisions_s", "p50_ms", "rss_mb", "cpu_pct", "temp_c"):
        ys = np.asarray([r[key] for r in rows], dtype=float)
        first, last = ys[0], ys[-1]
        change = (last - first) / first if np.isfinite(first) and first else float("nan")
        mids = (edges[:-1] + edges[1:]) / 2
        drift.append(
            {
                "metric": key,
                "first": first,
                "last": last,
                "change_pct": 100 * change,
                "slope_per_min": slope_per_min(mids, ys),
                "drifts": bool(np.isfinite(change) and abs(change) > DRIFT_TOLERANCE),
            }
        )
    return {
        "seconds": result.seconds,
        "decisions": sum(int(w["decisions"]) for w in lat_windows),
        "windows": rows,
        "drift": drift,
        "throttled_bits_seen": sorted({hex(b) for b in throttled}),
        "sources": result.extra.get("sysmon_sources", []),
        "samples": samples,
    }


def plot(doc: dict[str, Any], path: Path) -> Path:
    """Time series of the samples and of per-window frame rate and latency."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    w = doc["windows"]
    mid = [(r["from_s"] + r["to_s"]) / 2 for r in w]
    st = [s["t_s"] for s in doc["samples"]]
    fig, axes = plt.subplots(4, 1, figsize=(7, 8), sharex=True)
    axes[0].plot(mid, [r["decisions_s"] for r in w], "o-")
    axes[0].set_ylabel("decisions/s")
    axes[1].plot(mid, [r["p50_ms"] for r in w], "o-", label="p50")
    axes[1].plot(mid, [r["p95_ms"] for r in w], "o-", label="p95")
    axes[1].set_ylabel("latency (ms)")
    axes[1].legend(fontsize=8)
    axes[2].plot(st, [s["rss_mb"] for s in doc["samples"]])
    axes[2].set_ylabel("RSS (MB)")
    axes[3].plot(st, [s["cpu_pct"] for s in doc["samples"]], label="edge process CPU %")
    temps = [max(s["temps_c"].values(), default=float("nan")) for s in doc["samples"]]
    axes[3].plot(st, temps, label="hottest zone (C)")
    axes[3].set_xlabel("time (s)")
    axes[3].legend(fontsize=8)
    for ax in axes:
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
