"""The real-time cells of a `measure` sweep (`--loop realtime|both`): rows, tables, CSV.

A real-time cell runs the env on a clock at --control-hz (edge/realtime.py): each tick
sends its observation and applies the newest action that has come back. Its row gives
decision latency (send to reply) percentiles, the applied action's age in ticks
(p50/p95/max, nearest rank, and the histogram), the share of stale ticks (age >= 1 or the
default action), and the episode return, beside the sync loop's return on the same link.
"""

from __future__ import annotations

import csv
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from edge.realtime import age_summary
from splitedge.output import table

COLUMNS = [
    "link", "mode", "clients", "control_hz", "strategy", "p50_ms", "p95_ms", "age_p50", "age_p95",
    "age_max", "stale_share", "unsent", "overruns", "episode_return", "episodes",
    "sync_return", "sync_episodes",
]  # fmt: skip
EXPLAINED = (
    "Real time: the env steps every 1/control_hz s whatever the link does; each tick sends "
    "its observation and applies the newest action that has come back (held when none has; "
    "the client's default action before the first of an episode). `strategy`: how the "
    "bundle hides the link's latency: `hold` (a plain head), `delay-aware (history D)` (the "
    "head also reads the last D actions, as the device knows them), or `chunk H` (the head "
    "answers H actions and the device plays the newest chunk's action for each tick; the "
    "age is then the ticks since that chunk's observation). `p50_ms`/`p95_ms`: "
    "decision latency, send to reply. `age_*`: ticks between the observation an action "
    "answered and the tick it was applied (nearest-rank percentiles). `stale_share`: ticks "
    "acting on an action at least one tick old, or on the default action (`default` in the "
    "histogram). "
    "`unsent`: ticks that sent nothing (requests in flight at the cap, or not connected). "
    "`overruns`: ticks that started a whole period late. `episode_return`: the mean return "
    "of the `episodes` finished episodes (of the running one when none finished), next to "
    "the sync loop's `sync_return` on the same link with the same seeds. A run shorter than "
    "an episode censors the long ones: give --steps a few episodes' worth."
)


def episode_return(finished: Sequence[float], partial: Sequence[float]) -> tuple[float, int]:
    """(return, finished episodes): the mean finished return, else the running episodes'."""
    if finished:
        return sum(finished) / len(finished), len(finished)
    return (sum(partial) / len(partial) if partial else float("nan")), 0


def summarise(results: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """One cell's real-time numbers from every client's edge.realtime.RealtimeResult.as_dict()."""
    ages = [a for r in results for a in r["ages"]]
    ret, episodes = episode_return(
        [x for r in results for x in r["episode_returns"]], [r["partial_return"] for r in results]
    )
    strategies = sorted({str(r.get("strategy", "hold")) for r in results})
    return {
        "strategy": ", ".join(strategies) or "hold",
        **age_summary(ages),
        "unsent": sum(r["unsent"] for r in results),
        "overruns": sum(r["overruns"] for r in results),
        "episode_return": ret,
        "episodes": episodes,
    }


def rows(doc: dict[str, Any]) -> list[dict[str, Any]]:
    """The sweep's real-time rows (none for a sync-only sweep)."""
    return list(doc.get("realtime", []))


def render(doc: dict[str, Any]) -> str:
    """The real-time table and each cell's age histogram ('' without real-time cells)."""
    rt = rows(doc)
    if not rt:
        return ""
    text = table(rt, COLUMNS, title="real time: decision latency (ms), action age (ticks), return")
    hist = [f"  {_name(r)}: " + _hist(r["age_hist"], r["default_ticks"]) for r in rt]
    return text + "\n\naction age histogram (ticks: count)\n" + "\n".join(hist)


def markdown(doc: dict[str, Any], md_table: Any) -> list[str]:
    """Markdown lines of the real-time section ([] without real-time cells)."""
    rt = rows(doc)
    if not rt:
        return []
    return ["", "## Real time", "", EXPLAINED, "", md_table(rt, COLUMNS), "",
            "Action age histograms (ticks: count):", "",
            *(f"- {_name(r)}: {_hist(r['age_hist'], r['default_ticks'])}" for r in rt)]  # fmt: skip


def write_csv(doc: dict[str, Any], out: Path) -> list[Path]:
    """realtime.csv (the histogram as a JSON object) when there are real-time cells."""
    rt = rows(doc)
    if not rt:
        return []
    path = out / "realtime.csv"
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rt[0].keys()))
        w.writeheader()
        w.writerows({**r, "age_hist": json.dumps(r["age_hist"])} for r in rt)
    return [path]


def _name(r: dict[str, Any]) -> str:
    return f"{r['link']}/{r['mode']}" + (f"/x{r['clients']}" if r.get("clients", 1) > 1 else "")


def _hist(hist: dict[str, int], default_ticks: int) -> str:
    parts = [f"{age}: {n}" for age, n in hist.items()]
    if default_ticks:
        parts.insert(0, f"default: {default_ticks}")
    return ", ".join(parts) or "-"
