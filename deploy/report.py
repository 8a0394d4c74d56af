"""Write a sweep's CSV, JSON, latency CDF and p50-vs-bound plots, and render its tables."""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any

from deploy import realtime_report
from splitedge.output import table

COLUMNS = [
    "link", "mode", "p50_ms", "p95_ms", "p99_ms", "bound_ms", "p50_minus_bound_ms",
    "up_B", "down_B", "msg_up_B", "server_cpu_ms", "fallbacks",
]  # fmt: skip
SCALE_COLUMNS = [
    "link", "mode", "clients", "steps", "p50_ms", "p95_ms", "p99_ms", "bound_ms",
    "decisions_s", "up_B", "down_B", "server_cpu_ms", "fallbacks",
]  # fmt: skip
METHOD = {
    "netem": "The policy server runs in one network namespace and the edge clients in another, "
    "joined by a veth pair with segmentation offloads off; netem on each veth end applies the "
    "profile's one-way delay, jitter, rate and queue.",
    "tbf": "The policy server runs in one network namespace and the edge clients in another, "
    "joined by a veth pair with segmentation offloads off. A strict-burst tbf on each veth end "
    "sets the rate; a lowest-priority filler flow keeps its bucket empty, so each packet waits "
    "for its own transmission time as on a real serial link (a token bucket would otherwise "
    "pass a lone small packet in 0 ms). The userspace emulator, in the edge namespace with its "
    "own rate shaping off, adds the one-way delay and jitter in each direction.",
    "remote": "No emulation: the edge clients run here against the running server named by "
    "--server; a counting-only loopback proxy reads the bytes, and the bound's round trip is "
    "the median TCP connect time to it.",
    "proxy": "A userspace TCP proxy (deploy/link) serialises each direction at the profile's "
    "rate and adds the one-way delay and jitter; edge clients dial it on loopback.",
}
SLOW_LINK_KBIT = 1000  # the bars apply to links with a direction this slow or slower
SPEEDUP_BAR = 5.0
BOUND_BAR = (0.05, 3.0)  # split p50 within 5% or 3 ms of its bound, whichever is larger


def columns(doc: dict[str, Any]) -> list[str]:
    """COLUMNS, plus loss and retransmissions when any link loses packets or TCP retransmitted,
    plus rate changes when a link follows a trace."""
    rows, profiles = doc["rows"], doc.get("profiles", {}).values()
    extra = []
    if any(p.get("loss_pct") for p in profiles) or any(r.get("retrans") for r in rows):
        extra += ["loss_up_pct", "loss_down_pct", "retrans"]
    if any(r.get("rate_changes") for r in rows):
        extra.append("rate_changes")
    return [*COLUMNS, *extra]


def single(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The one-client rows (the latency table); rows without a clients key count as one."""
    return [r for r in rows if r.get("clients", 1) == 1]


def ratios(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per link: raw/split ratios of p50 latency and of bytes up, measured in the same run."""
    out = []
    by = {(r["link"], r["mode"]): r for r in single(rows)}
    for link in dict.fromkeys(r["link"] for r in rows):
        split = by.get((link, "split"))
        if not split or not split["up_B"] or not split["p50_ms"] == split["p50_ms"]:
            continue  # no usable split row (all fallbacks) to compare against
        for mode in ("raw", "raw-png", "raw-jpeg"):
            other = by.get((link, mode))
            if other:
                out.append(
                    {
                        "link": link,
                        "vs": mode,
                        "p50_speedup": other["p50_ms"] / split["p50_ms"],
                        "bound_ratio": other["bound_ms"] / split["bound_ms"],
                        "wire_bytes_up_ratio": other["up_B"] / split["up_B"],
                        "msg_bytes_up_ratio": other["msg_up_B"] / split["msg_up_B"],
                    }
                )
    return out


def bars(doc: dict[str, Any]) -> list[dict[str, Any]]:
    """The issue's bars per slow link: split >= 5x faster than raw; split p50 near its bound."""
    out = []
    by = {(r["link"], r["mode"]): r for r in single(doc["rows"])}
    for link, prof in doc.get("profiles", {}).items():
        split, raw = by.get((link, "split")), by.get((link, "raw"))
        if split is None or min(prof["up_kbit"], prof["down_kbit"]) > SLOW_LINK_KBIT:
            continue
        slack = max(BOUND_BAR[0] * split["bound_ms"], BOUND_BAR[1])
        row = {
            "link": link,
            "split_p50_ms": split["p50_ms"],
            "split_bound_ms": split["bound_ms"],
            "within_bound": abs(split["p50_ms"] - split["bound_ms"]) <= slack,
        }
        if raw is not None:
            row["raw_over_split_p50"] = raw["p50_ms"] / split["p50_ms"]
            # The most any emulator could show: raw's bound over split's, same bytes, zero overhead.
            row["ceiling_from_bounds"] = raw["bound_ms"] / split["bound_ms"]
            row["speedup_5x"] = row["raw_over_split_p50"] >= SPEEDUP_BAR
            row["raw_msg_B"] = raw["msg_up_B"]
            row["raw_msg_B_for_5x"] = raw_message_for_speedup(prof, split, raw)
        out.append(row)
    return out


def raw_message_for_speedup(
    prof: dict[str, Any], split: dict[str, Any], raw: dict[str, Any], speedup: float = SPEEDUP_BAR
) -> float:
    """The raw observation message (bytes) at which raw's bound is `speedup` x split's bound on
    this link: raw's measured fixed part (round trip, reply, compute) kept, its uplink
    serialisation grown at the measured wire-bytes-per-message-byte ratio."""
    per_msg_byte = raw["bound_up_B"] / raw["msg_up_B"]  # headers, ACK-free frames
    uplink_ms = raw["bound_up_B"] * 8 / prof["up_kbit"]
    fixed_ms = raw["bound_ms"] - uplink_ms
    need_ms = speedup * split["bound_ms"] - fixed_ms
    return max(0.0, need_ms * prof["up_kbit"] / 8 / per_msg_byte)


def render(doc: dict[str, Any]) -> str:
    """The human tables of a sweep: latency, raw/split ratios, scalability, backend."""
    unit = "Ethernet frames" if doc.get("link_backend", "proxy") != "proxy" else "HTTP/2 bytes"
    text = ""
    if doc["rows"]:  # none when only the real-time loop ran
        text = table(
            single(doc["rows"]),
            columns(doc),
            title=f"decision latency (ms) and bytes per decision through the link ({unit})",
        )
    if rt := realtime_report.render(doc):
        text = (text + "\n\n" if text else "") + rt
    r = ratios(doc["rows"])
    if r:
        text += "\n\n" + table(r, title="raw offload vs split, same run")
    scale = [row for row in doc["rows"] if row.get("clients", 1) > 1]
    if scale:
        text += "\n\n" + table(
            [row for row in doc["rows"] if _scaled_link(doc, row["link"])],
            SCALE_COLUMNS,
            title="scalability: concurrent edge clients (processes) against one server",
        )
    if doc.get("self_check"):
        checks = doc["self_check"]
        cols = list(dict.fromkeys(k for row in checks for k in row))
        text += "\n\n" + table(checks, cols, title="emulator self-check against theory")
    return text + f"\n\nlink backend: {backend_line(doc)}\nencoder: {doc['encoder']}"


def backend_line(doc: dict[str, Any]) -> str:
    """The backend that ran and why better ones did not."""
    reasons = doc.get("link_backend_reasons") or []
    return doc.get("link_backend", "proxy") + (f" ({'; '.join(reasons)})" if reasons else "")


def _scaled_link(doc: dict[str, Any], link: str) -> bool:
    return any(r["link"] == link and r.get("clients", 1) > 1 for r in doc["rows"])


def write(doc: dict[str, Any], out: Path) -> list[Path]:
    """results.json; with sync cells results.csv, latency_cdf.png and p50_vs_bound.png; with
    real-time cells realtime.csv; all under out."""
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(doc, indent=2) + "\n")
    paths = [out / "results.json"]
    if doc["rows"]:
        with open(out / "results.csv", "w", newline="") as f:
            # every row's keys: a cell resumed from an older run may lack newer columns
            keys = list(dict.fromkeys(k for row in doc["rows"] for k in row))
            w = csv.DictWriter(f, fieldnames=keys)
            w.writeheader()
            w.writerows(doc["rows"])
        paths.append(out / "results.csv")
        paths.append(plot_cdf(doc, out / "latency_cdf.png"))
        paths.append(plot_bound(doc, out / "p50_vs_bound.png"))
    return paths + realtime_report.write_csv(doc, out)


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_cdf(doc: dict[str, Any], path: Path) -> Path:
    """One panel per link: empirical CDF of decision latency per mode, bound as a dashed line."""
    import numpy as np

    plt = _pyplot()
    rows = single(doc["rows"])
    links = list(dict.fromkeys(r["link"] for r in rows))
    fig, axes = plt.subplots(1, len(links), figsize=(4.2 * len(links), 3.4), squeeze=False)
    for ax, link in zip(axes[0], links, strict=True):
        for row in (r for r in rows if r["link"] == link):
            lat = np.sort(np.asarray(doc["latencies_ms"][f"{link}/{row['mode']}"]))
            if lat.size == 0:
                continue
            (line,) = ax.plot(lat, np.arange(1, lat.size + 1) / lat.size, label=row["mode"])
            ax.axvline(row["bound_ms"], color=line.get_color(), ls="--", lw=0.8)
        ax.set_title(link)
        ax.set_xlabel("decision latency (ms)")
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("CDF (dashed: analytic bound)")
    axes[0][-1].legend(loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_bound(doc: dict[str, Any], path: Path) -> Path:
    """p50 against its analytic bound for every one-client cell (log-log, y = x dashed)."""
    plt = _pyplot()
    rows = [r for r in single(doc["rows"]) if r["p50_ms"] == r["p50_ms"]]
    fig, ax = plt.subplots(figsize=(5.2, 4.6))
    for mode, marker in (("split", "o"), ("raw", "s"), ("raw-png", "^"), ("raw-jpeg", "v")):
        sel = [r for r in rows if r["mode"] == mode]
        if sel:
            ax.scatter([r["bound_ms"] for r in sel], [r["p50_ms"] for r in sel], marker=marker,
                       label=mode)  # fmt: skip
            for r in sel:
                ax.annotate(r["link"], (r["bound_ms"], r["p50_ms"]), fontsize=6, alpha=0.7)
    lo = min(min(r["bound_ms"], r["p50_ms"]) for r in rows) * 0.8
    hi = max(max(r["bound_ms"], r["p50_ms"]) for r in rows) * 1.25
    ax.plot([lo, hi], [lo, hi], "k--", lw=0.8, label="p50 = bound")
    ax.set(xscale="log", yscale="log", xlabel="analytic bound (ms)", ylabel="measured p50 (ms)")
    ax.set_title(f"p50 vs bound ({doc.get('link_backend', 'proxy')} backend)")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _md_table(rows: list[dict[str, Any]], columns: list[str]) -> str:
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for r in rows:
        lines.append("| " + " | ".join(_md(r.get(c, "")) for c in columns) + " |")
    return "\n".join(lines)


def markdown(doc: dict[str, Any], command: str) -> str:
    """A markdown report of a sweep that names the command that produced it."""
    kernel = doc.get("link_backend", "proxy") != "proxy"
    parts = [
        f"Generated by `{command}` on {doc['measured_at']} "
        f"({doc['config']['steps']} decisions per one-client cell after "
        f"{doc['config']['warmup']} warm-up; encoder: {doc['encoder']}).",
        "",
        f"Link backend: **{backend_line(doc)}**. {METHOD[doc.get('link_backend', 'proxy')]}",
        "",
        *(f"- {n}" for n in doc.get("notes", [])),
        "",
        "Latency is decision latency (observation ready -> action in hand), in ms. `bound_ms` is "
        "2 x one-way delay + serialisation of the data-carrying bytes the link metered per "
        "decision, both ways (pure TCP ACKs cross the idle direction off the critical path), "
        "+ measured encode + measured server compute. `up_B`/`down_B` are all bytes the link "
        "metered per decision: "
        + (
            "Ethernet frames (IP/TCP headers and ACKs included) as the kernel qdiscs meter them"
            if kernel
            else "HTTP/2 bytes through the userspace emulator"
        )
        + "; `msg_up_B` is the gRPC message alone (protobuf + 5-byte prefix). `server_cpu_ms` is "
        "the server process's CPU time per decision.",
        "",
        _md_table(single(doc["rows"]), columns(doc)) if doc["rows"] else "(no sync cells)",
        *realtime_report.markdown(doc, _md_table),
    ]
    r = ratios(doc["rows"])
    if r:
        parts += ["", "Raw offload vs split, same run (`bound_ratio`: the same ratio of bounds):",
                  "", _md_table(r, list(r[0].keys()))]  # fmt: skip
    if any(row.get("clients", 1) > 1 for row in doc["rows"]):
        parts += [
            "",
            "## Scalability",
            "",
            "N edge clients, each its own process, released together against one server "
            "process; `steps` is per client, `decisions_s` counts all clients.",
            "",
            _md_table([x for x in doc["rows"] if _scaled_link(doc, x["link"])], SCALE_COLUMNS),
        ]
    b = bars(doc)
    if b:
        parts += ["", f"## Bars on links with a direction <= {SLOW_LINK_KBIT} kbit/s", "",
                  "`within_bound`: split p50 within 5% or 3 ms of its bound. `speedup_5x`: raw p50 "
                  ">= 5 x split p50. `ceiling_from_bounds` is raw's bound over split's: no emulator "
                  "and no software could show a larger speedup on that link. `raw_msg_B_for_5x`: the raw "
                  "observation message at which that ceiling reaches 5x, next to the one this bundle "
                  "sends (`raw_msg_B`); on long round trips only a much larger frame gets there.",
                  "",
                  _md_table(b, list(dict.fromkeys(k for row in b for k in row)))]  # fmt: skip
    if doc.get("self_check"):
        checks = doc["self_check"]
        cols = list(dict.fromkeys(k for row in checks for k in row))
        parts += ["", "## Emulator self-check", "", "28 KB and 512 B over 1 Mbit/s with 20 ms "
                  "each way; `ok` means within 5% of `theory_ms`.", "", _md_table(checks, cols)]  # fmt: skip
    return "\n".join(parts) + "\n"


def _md(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.1f}" if abs(v) >= 10 else f"{v:.2f}"
    return str(v)
