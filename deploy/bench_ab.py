"""Before/after table from repeated `splitedge bench server --json` runs of two checkouts.

One run of `bench server` on a shared 2-core machine moves by tens of percent from run to
run, mostly through the naive baseline; a change is only visible against that spread. So
run each checkout several times, interleaved (before, after, before, after, ...), and
compare medians, with the before runs' own spread printed beside them:

    python -m deploy.bench_ab --before pre-*.json --after post-*.json

When the naive baseline's code is the same in both checkouts, its runs are one sample of
one server whatever the side: the second table pools them (median over every run) and
divides by each side's own median, so the ratio moves only with the splitedge server.
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path
from typing import Any

SERVER_CPU = "server_cpu_ms_per_decision"
RATIOS = ("naive / split server CPU", "split / naive decisions/s")


def _load(paths: list[Path]) -> list[dict[str, Any]]:
    runs = []
    for p in paths:
        text = p.read_text().strip()
        if not text:
            raise SystemExit(f"{p} is empty: that run did not finish")
        runs.append(json.loads(text))
    return runs


def _rows(run: dict[str, Any]) -> dict[tuple[int, str, str], dict[str, Any]]:
    return {(r["clients"], r["rpc"], r["server"]): r for r in run["rows"]}


def _ratios(run: dict[str, Any]) -> dict[tuple[int, str], dict[str, Any]]:
    return {(r["clients"], r["rpc"]): r for r in run["ratios"]}


def _cell(before: list[float], after: list[float]) -> str:
    b, a = statistics.median(before), statistics.median(after)
    return (
        f"{b:.2f} ({min(before):.2f}-{max(before):.2f}) → {a:.2f} ({min(after):.2f}-"
        f"{max(after):.2f}), {100 * (a / b - 1):+.1f}%"
    )


def table(before: list[dict[str, Any]], after: list[dict[str, Any]]) -> list[str]:
    """Markdown: medians (min-max) before → after, per cell, for the split server and the ratios."""
    head = ["clients", "rpc", f"split {SERVER_CPU}", "split decisions/s", *RATIOS]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for clients, rpc in sorted(_ratios(before[0])):
        key = (clients, rpc, "splitedge split")
        cells = [
            _cell(
                [_rows(r)[key][SERVER_CPU] for r in before],
                [_rows(r)[key][SERVER_CPU] for r in after],
            ),
            _cell(
                [_rows(r)[key]["decisions_per_s"] for r in before],
                [_rows(r)[key]["decisions_per_s"] for r in after],
            ),
        ]
        for name in RATIOS:
            cells.append(
                _cell(
                    [_ratios(r)[(clients, rpc)][name] for r in before],
                    [_ratios(r)[(clients, rpc)][name] for r in after],
                )
            )
        lines.append(f"| {clients} | {rpc} | " + " | ".join(cells) + " |")
    return lines


def pooled_table(before: list[dict[str, Any]], after: list[dict[str, Any]]) -> list[str]:
    """Markdown: the ratios against the naive baseline's median over all runs of both sides."""
    lines = [
        "| clients | rpc | naive (pooled) server CPU ms | "
        + " | ".join(f"{n}, pooled baseline: before → after" for n in RATIOS)
        + " |",
        "|---|---|---|" + "---|" * len(RATIOS),
    ]
    runs = before + after
    for clients, rpc in sorted(_ratios(before[0])):
        naive, split = (clients, rpc, "naive SB3"), (clients, rpc, "splitedge split")
        n_cpu = statistics.median(_rows(r)[naive][SERVER_CPU] for r in runs)
        n_dps = statistics.median(_rows(r)[naive]["decisions_per_s"] for r in runs)
        cpu = [
            n_cpu / statistics.median(_rows(r)[split][SERVER_CPU] for r in side)
            for side in (before, after)
        ]
        dps = [
            statistics.median(_rows(r)[split]["decisions_per_s"] for r in side) / n_dps
            for side in (before, after)
        ]
        cells = [f"{a:.2f} → {b:.2f} ({100 * (b / a - 1):+.1f}%)" for a, b in (cpu, dps)]
        lines.append(f"| {clients} | {rpc} | {n_cpu:.2f} | " + " | ".join(cells) + " |")
    return lines


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument(
        "--before", type=Path, nargs="+", required=True, help="bench server --json files"
    )
    p.add_argument("--after", type=Path, nargs="+", required=True, help="bench server --json files")
    args = p.parse_args(argv)
    before, after = _load(args.before), _load(args.after)
    print("\n".join(table(before, after)))
    print()
    print("\n".join(pooled_table(before, after)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
