"""`splitedge report learning`: the learning-parity report from `splitedge train` result files."""

from __future__ import annotations

import argparse
from pathlib import Path

from splitedge.errors import SplitedgeError
from splitedge.output import emit, table


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("report", help="turn run results into markdown reports")
    kinds = p.add_subparsers(dest="kind", required=True)
    lp = kinds.add_parser(
        "learning",
        help="table + learning curves from `splitedge train` runs",
        description="Summarise result.json files (mean ± std across seeds per task/algorithm/"
        "encoder, random-policy return, FLOPs and bytes per step) into markdown with one "
        "learning-curve PNG per task beside it.",
    )
    lp.add_argument(
        "--runs",
        type=Path,
        default=Path("runs/learning"),
        help="folder searched for run directories with result.json (default: %(default)s)",
    )
    lp.add_argument(
        "--out",
        type=Path,
        default=Path("docs/results/learning.md"),
        help="markdown file to write; curve PNGs go beside it (default: %(default)s)",
    )
    lp.add_argument("--json", action="store_true", help="print the summary as JSON")
    lp.set_defaults(func=run_learning)


def run_learning(args: argparse.Namespace) -> int:
    if not args.runs.is_dir():
        raise SplitedgeError(
            f"{args.runs} is not a directory; point --runs at `splitedge train` outputs"
        )
    try:
        from models.learning_report import write_report
    except ImportError as e:
        raise SplitedgeError(f"the report needs numpy and matplotlib ({e})") from e
    command = (
        " ".join(["splitedge", *args.argv])
        if getattr(args, "argv", None)
        else (f"splitedge report learning --runs {args.runs} --out {args.out}")
    )
    try:
        summary = write_report(args.runs, args.out, command)
    except ValueError as e:
        raise SplitedgeError(str(e)) from e
    rows = [{"runs": summary["runs"], "cells": summary["cells"], "report": summary["report"]}]
    emit(summary, args.json, table(rows, title="learning report"))
    return 0
