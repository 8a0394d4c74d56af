"""Write a sweep's CSV, JSON and latency CDF plots, and render its table."""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any

from splitedge.output import table

COLUMNS = ["link", "mode", "p50_ms", "p95_ms", "p99_ms", "bound_ms", "p50_minus_bound_ms",
           "up_B", "down_B", "fallbacks"]


def ratios(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per link: raw/split ratios of p50 latency and of bytes up, measured in the same run."""
    out = []
    by = {(r["link"], r["mode"]): r for r in rows}
    for link in dict.fromkeys(r["link"] for r in rows):
        split = by.get((link, "split"))
        if not split:
            continue
        for mode in ("raw", "raw-png", "raw-jpeg"):
            other = by.get((link, mode))
            if other:
                out.append({"link": link, "vs": mode,
                            "p50_speedup": other["p50_ms"] / split["p50_ms"],
                            "bytes_up_ratio": other["up_B"] / split["up_B"]})
    return out


def render(doc: dict[str, Any]) -> str:
    """The human table of a sweep plus the raw/split ratios."""
    text = table(doc["rows"], COLUMNS, title="decision latency (ms) and bytes per step through the link")
    r = ratios(doc["rows"])
    if r:
        text += "\n\n" + table(r, title="raw offload vs split, same run")
    return text + f"\n\nencoder: {doc['encoder']}"


def write(doc: dict[str, Any], out: Path) -> list[Path]:
    """results.json, results.csv and latency_cdf.png under out; returns the paths written."""
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(doc, indent=2) + "\n")
    with open(out / "results.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(doc["rows"][0].keys()))
        w.writeheader()
        w.writerows(doc["rows"])
    paths = [out / "results.json", out / "results.csv"]
    paths.append(plot_cdf(doc, out / "latency_cdf.png"))
    return paths


def plot_cdf(doc: dict[str, Any], path: Path) -> Path:
    """One panel per link: empirical CDF of decision latency per mode, bound as a dashed line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    links = list(dict.fromkeys(r["link"] for r in doc["rows"]))
    fig, axes = plt.subplots(1, len(links), figsize=(4.2 * len(links), 3.4), squeeze=False)
    for ax, link in zip(axes[0], links, strict=True):
        for row in (r for r in doc["rows"] if r["link"] == link):
            lat = np.sort(np.asarray(doc["latencies_ms"][f"{link}/{row['mode']}"]))
            if lat.size == 0:
                continue
            (line,) = ax.plot(lat, np.arange(1, lat.size + 1) / lat.size, label=row["mode"])
            ax.axvline(row["bound_ms"], color=line.get_color(), ls="--", lw=0.8)
        ax.set_xscale("log")
        ax.set_title(link)
        ax.set_xlabel("decision latency (ms, log)")
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("CDF (dashed: analytic bound)")
    axes[0][-1].legend(loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
