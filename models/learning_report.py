"""docs/results/learning.md from a directory of `splitedge train` result.json files."""

from __future__ import annotations

import json
import warnings
from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np

ENCODER_ORDER = ("miniconv", "miniconv-es2", "naturecnn")
SPLIT_ENCODERS = ("miniconv", "miniconv-es2")
BASELINE = "naturecnn"
SMOOTH_EPISODES = 20


def load_runs(runs: Path) -> list[dict[str, Any]]:
    """Every result.json under `runs` (any depth), each with its path recorded."""
    out = []
    for path in sorted(runs.rglob("result.json")):
        result = json.loads(path.read_text())
        result["path"] = str(path.parent)
        out.append(result)
    return out


def group(results: list[dict[str, Any]]) -> dict[tuple[str, str, str], list[dict[str, Any]]]:
    """Runs keyed by (task, algo, encoder)."""
    cells: dict[tuple[str, str, str], list[dict[str, Any]]] = defaultdict(list)
    for r in results:
        c = r["config"]
        cells[(c["task"], c["algo"], c["encoder"])].append(r)
    return dict(cells)


def mean_std(values: list[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for a single value)."""
    a = np.asarray(values, np.float64)
    return float(a.mean()), float(a.std(ddof=1)) if len(a) > 1 else 0.0


def cell_summary(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """One table row's numbers for the seeds of a cell."""
    final = mean_std([r["final_100_mean_return"] for r in runs])
    det = mean_std([r["deterministic_eval_mean_return"] for r in runs])
    costs = runs[0]["costs"]
    return {
        "seeds": sorted(r["config"]["seed"] for r in runs),
        "final": final,
        "eval": det,
        "random": float(np.mean([r["random_policy_mean_return"] for r in runs])),
        "timesteps": int(np.mean([r["timesteps"] for r in runs])),
        "episodes_in_final": int(np.min([r["final_100_episodes"] for r in runs])),
        "episodes": int(np.min([r.get("episodes", r["final_100_episodes"]) for r in runs])),
        "minutes": float(np.mean([r["train_seconds"] for r in runs])) / 60.0,
        "costs": costs,
    }


def _pm(ms: tuple[float, float]) -> str:
    return f"{ms[0]:.1f} ± {ms[1]:.1f}"


def _flops(n: int) -> str:
    return f"{n / 1e6:.2f} M" if n >= 1e5 else f"{n / 1e3:.1f} k"


def results_table(cells: dict[tuple[str, str, str], dict[str, Any]]) -> list[str]:
    """Markdown table: returns and per-decision costs for every cell."""
    lines = [
        "| task | algo | encoder | seeds | final-100 return | eval return (deterministic) "
        "| random | steps | min/run | encoder params | device FLOPs | server FLOPs/request "
        "| bytes sent/step |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for (task, algo, enc), s in cells.items():
        c = s["costs"]
        split = enc in SPLIT_ENCODERS
        device = _flops(c["encoder_flops"]) if split else "0 (raw offload)"
        sent = (
            f"{c['feature_bytes_per_step']} (features)"
            if split
            else f"{c['raw_bytes_per_step']} (raw)"
        )
        lines.append(
            f"| {task} | {algo} | {enc} | {len(s['seeds'])} | {_pm(s['final'])} "
            f"| {_pm(s['eval'])} | {s['random']:.1f} | {s['timesteps']} | {s['minutes']:.1f} "
            f"| {c['encoder_params']} | {device} | {_flops(c['server_flops'])} | {sent} |"
        )
    return lines


def parity_lines(cells: dict[tuple[str, str, str], dict[str, Any]]) -> list[str]:
    """Per task: each split encoder's gap to Full-CNN, and the server FLOPs ratio."""
    lines = []
    tasks = sorted({(t, a) for t, a, _ in cells})
    for task, algo in tasks:
        base = cells.get((task, algo, BASELINE))
        for enc in SPLIT_ENCODERS:
            s = cells.get((task, algo, enc))
            if s is None or base is None:
                continue
            for metric, label in (("final", "final-100"), ("eval", "deterministic eval")):
                gap = s[metric][0] - base[metric][0]
                within = abs(gap) <= base[metric][1]
                verdict = "within" if within else "outside"
                lines.append(
                    f"- {task} / {algo}, {label}: {enc} {s[metric][0]:.1f} vs Full-CNN "
                    f"{base[metric][0]:.1f} ± {base[metric][1]:.1f}: gap {gap:+.1f}, "
                    f"{verdict} one Full-CNN standard deviation."
                )
        mini, full = cells.get((task, algo, "miniconv")), base
        if mini is not None:
            head = mini["costs"]["head_flops"]
            own_full = mini["costs"]["full_flops"]
            text = (
                f"- {task} / {algo}, server FLOPs per request: split (head only) "
                f"{_flops(head)} vs raw offload of the same MiniConv policy {_flops(own_full)}: "
                f"ratio {head / own_full:.3f} ({own_full / head:.1f}x less)"
            )
            if full is not None:
                nat = full["costs"]["full_flops"]
                text += (
                    f"; vs raw offload of the Full-CNN policy {_flops(nat)}: ratio "
                    f"{head / nat:.4f} ({nat / head:.0f}x less)"
                )
            b = mini["costs"]
            text += (
                f". Bytes per step: {b['feature_bytes_per_step']} feature bytes vs "
                f"{b['raw_bytes_per_step']} raw ({b['raw_bytes_per_step'] / b['feature_bytes_per_step']:.0f}x fewer)."
            )
            lines.append(text)
    return lines


def smoothed_curve(run: dict[str, Any], grid: np.ndarray) -> np.ndarray:
    """The run's training-episode returns (rolling mean of 20) interpolated onto `grid` steps."""
    steps = np.asarray(run["curve"]["steps"], np.float64)
    returns = np.asarray(run["curve"]["returns"], np.float64)
    if len(steps) == 0:
        return np.full(len(grid), np.nan)
    kernel = np.ones(min(SMOOTH_EPISODES, len(returns)))
    sums = np.convolve(returns, kernel, "full")[: len(returns)]
    counts = np.convolve(np.ones(len(returns)), kernel, "full")[: len(returns)]
    y = np.interp(grid, steps, sums / counts)
    y[grid < steps[0]] = np.nan
    return y


def plot_task(
    task: str, algo: str, by_encoder: dict[str, list[dict[str, Any]]], random: float, path: Path
) -> None:
    """One PNG: mean +- std across seeds of smoothed training returns per encoder."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.0), dpi=100)
    top = max(r["timesteps"] for runs in by_encoder.values() for r in runs)
    grid = np.linspace(0, top, 200)
    for enc in ENCODER_ORDER:
        runs = by_encoder.get(enc)
        if not runs:
            continue
        ys = np.stack([smoothed_curve(r, grid) for r in runs])
        with warnings.catch_warnings():  # steps before any seed's first episode are all-NaN
            warnings.simplefilter("ignore", RuntimeWarning)
            mean, std = np.nanmean(ys, axis=0), np.nanstd(ys, axis=0)
        ax.plot(grid, mean, label=f"{enc} ({len(runs)} seeds)")
        ax.fill_between(grid, mean - std, mean + std, alpha=0.2)
    ax.axhline(random, color="grey", linestyle="--", label="random policy")
    ax.set_xlabel("environment steps")
    ax.set_ylabel(f"training episode return (mean of {SMOOTH_EPISODES})")
    ax.set_title(f"{task} / {algo}: mean ± std across seeds")
    ax.legend(loc="best", fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def write_report(runs_dir: Path, out: Path, command: str, preamble: str = "") -> dict[str, Any]:
    """Write the markdown report and one plot per task next to it; return what it summarised."""
    results = load_runs(runs_dir)
    if not results:
        raise ValueError(f"no result.json under {runs_dir}; run `splitedge train` first")
    grouped = group(results)
    order = sorted(
        grouped,
        key=lambda k: (k[0], k[1], ENCODER_ORDER.index(k[2]) if k[2] in ENCODER_ORDER else 9),
    )
    cells = {k: cell_summary(grouped[k]) for k in order}
    out.parent.mkdir(parents=True, exist_ok=True)
    plots = []
    for task, algo in sorted({(t, a) for t, a, _ in cells}):
        by_enc = {e: grouped[(t, a, e)] for t, a, e in order if (t, a) == (task, algo)}
        random = float(np.mean([cells[(task, algo, e)]["random"] for e in by_enc]))
        png = out.parent / f"{out.stem}-{task}.png"
        plot_task(task, algo, by_enc, random, png)
        plots.append(png)
    lines = [
        "# Learning parity: split (MiniConv) vs Full-CNN policies",
        "",
        f"Generated by `{command}` from {len(results)} runs.",
        "",
        preamble,
        "## Results",
        "",
        *results_table(cells),
        "",
        "## MiniConv vs Full-CNN, and what the server computes",
        "",
        *parity_lines(cells),
        "",
        "## Learning curves",
        "",
        *[f"![{p.stem}]({p.name})" for p in plots],
        "",
        "## Runs",
        "",
        *[f"- `{r['command']}`" for r in results],
        "",
    ]
    out.write_text("\n".join(lines))
    return {
        "runs": len(results),
        "cells": len(cells),
        "report": str(out),
        "plots": [str(p) for p in plots],
    }
