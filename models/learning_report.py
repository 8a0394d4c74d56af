"""docs/results/learning.md from a directory of `splitedge train` result.json files."""

from __future__ import annotations

import json
import warnings
from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np

from deploy.iqm import iqm_interval

ENCODER_ORDER = ("miniconv", "miniconv-es2", "naturecnn")
SPLIT_ENCODERS = ("miniconv", "miniconv-es2")
BASELINE = "naturecnn"
SMOOTH_EPISODES = 20

METHOD = """\
How the runs were made: `python -m models.sweep --jobs 2` runs every cell below as
`splitedge train --task T --algo A --encoder E --seed S --timesteps N` (each run's exact
command is listed at the end), two at a time under `nice -n 19` with one torch thread
each, on a 2-core machine shared with other work; "min/run" is wall time under that load.

## Tasks

All three are rasterised from the simulator's true state into small uint8 frames
(numpy, `edge/envs/`), not rendered with pygame. That is faithful: each frame is a
deterministic picture of exactly the state the policy must act on (tests check the
drawn positions against the state), and velocities are visible only as differences
between stacked frames, as with a camera.

| task | simulator | observation | actions | algorithm | episode |
|---|---|---|---|---|---|
| cartpole-pixels | gymnasium CartPole-v1 | 3 stacked 48x48 frames (cart + pole) | 2 (discrete) | PPO | up to 500 steps, +1 per step |
| pendulum-pixels | gymnasium Pendulum-v1 (swing-up) | 2 stacked 40x40 frames (rod) | torque in [-2, 2] | SAC | 200 steps, reward -(angle² + 0.1 ω² + 0.001 u²) |
| reacher-pixels | numpy two-link reacher with Reacher-v5's geometry (MuJoCo cannot be installed here) | 1 40x40 frame (arm grey, target white; Markov: joints are velocity-controlled) | 2 joint velocities in [-1, 1] | DDPG | 50 steps, reward -distance/reach - 0.1 mean(a²) |

## Encoders and algorithms

- **miniconv**: the shader-compatible split encoder (`models/encoders.py`: 5x5/2 conv 8,
  3x3 conv 8, pool 2, 3x3 conv 4, pool 2), float activations, features sent as uint8.
- **miniconv-es2**: the same encoder trained quantisation-aware for the Pi Zero's
  OpenGL ES 2.0 path: every stored stage output is fake-quantised to 8 bits. Scales are
  recalibrated from the current weights every 2000 steps on 256 random-policy frames,
  and once more at the end on the exact frames the exporter calibrates on.
- **naturecnn** (Full-CNN baseline): SB3's NatureCNN (8x8/4 conv 32, 4x4/2 conv 64,
  3x3 conv 64, linear 512), run whole on the server on raw frames (raw offload).
- Hyper-parameters are the same for every encoder (`models/algos.py`). PPO: 8 envs,
  256 steps per env per update, batch 256, 4 epochs, learning rate 3e-4 decaying
  linearly to 0, policy/value heads 64-64. SAC and DDPG: batch 64, one gradient step
  per env step after 500 random steps, gamma 0.98, tau 0.01, heads 256-256, learning
  rate 1e-3 (SAC) / 5e-4 (DDPG, Gaussian action noise 0.3). Off-policy agents share one
  encoder between actor and critic, trained by the critic loss only, the actor reading
  detached features (DrQ / SAC-AE recipe). Nothing is tuned per encoder, so an encoder
  that fails under these shared settings might learn under others.

## Metrics

- **final-100 return**: mean return of the last 100 training episodes (with exploration
  noise for SAC/DDPG), mean ± sample standard deviation across seeds. When a run has
  fewer than 100 episodes (Pendulum: 200-step episodes) it is the mean over all of
  them, early random ones included; the table's steps column shows the budget.
- **eval return**: the trained policy, deterministic, over 20 fresh episodes.
- **IQM [95% CI]**: the interquartile mean across seeds (the mean of the middle half of
  the runs) with its 95% stratified-bootstrap confidence interval (`rliable`, 2,000
  resamples), as "Deep RL at the edge of the statistical precipice" recommends: with
  3 seeds the interval is wide, and that is the point; a single seed is a point.
- **random**: uniform random actions, 100 episodes.
- FLOPs: 2 per multiply-accumulate of conv and linear layers (torch's FlopCounterMode;
  biases, ReLU and pooling not counted), one observation. Device FLOPs: the encoder.
  Server FLOPs per request: the policy head (features -> deterministic action) when
  split; encoder + head on the raw frame for the Full-CNN raw-offload baseline.
  Bytes sent per step: uint8 features (split) or the raw uint8 frame stack.
"""


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
    finals = [r["final_100_mean_return"] for r in runs]
    evals = [r["deterministic_eval_mean_return"] for r in runs]
    costs = runs[0]["costs"]
    return {
        "seeds": sorted(r["config"]["seed"] for r in runs),
        "final": mean_std(finals),
        "eval": mean_std(evals),
        "final_iqm": iqm_interval(finals),
        "eval_iqm": iqm_interval(evals),
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
        "| task | algo | encoder | seeds | final-100 return | final-100 IQM [95% CI] "
        "| eval return (deterministic) | eval IQM [95% CI] "
        "| random | steps | min/run | encoder params | device FLOPs | server FLOPs/request "
        "| bytes sent/step |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
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
        n = s["episodes_in_final"]
        few = f" (all {n} episodes)" if n < 100 else ""
        lines.append(
            f"| {task} | {algo} | {enc} | {len(s['seeds'])} | {_pm(s['final'])}{few} "
            f"| {s['final_iqm'].text()} | {_pm(s['eval'])} | {s['eval_iqm'].text()} "
            f"| {s['random']:.1f} | {s['timesteps']} | {s['minutes']:.1f} "
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
                verdict = (
                    "within one Full-CNN standard deviation"
                    if within
                    else ("ahead" if gap > 0 else "behind")
                    + " by more than one Full-CNN standard deviation"
                )
                gain = base[metric][0] - base["random"]
                share = (
                    f"; {100 * (s[metric][0] - s['random']) / gain:.0f}% of Full-CNN's gain "
                    "over random"
                    if gain > 0
                    else ""
                )
                lines.append(
                    f"- {task} / {algo}, {label}: {enc} {_pm(s[metric])} vs Full-CNN "
                    f"{_pm(base[metric])}: gap {gap:+.1f}, "
                    f"{verdict}{share}."
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


def reacher_ik_return(episodes: int = 100, seed: int = 20_000) -> float:
    """Mean return on reacher-pixels of a scripted controller that reads the true state
    (damped least-squares Jacobian step toward the target): what "solved" looks like."""
    from edge.envs import make_env
    from edge.envs.pixel_reacher import LINKS, MAX_JOINT_STEP

    env = make_env("reacher-pixels")
    returns = []
    for ep in range(episodes):
        env.reset(seed=seed + ep)
        task, total, done = env.unwrapped, 0.0, False
        while not done:
            q1, q2 = task.joints
            s1, s12 = np.sin(q1), np.sin(q1 + q2)
            c1, c12 = np.cos(q1), np.cos(q1 + q2)
            jac = np.array(
                [[-LINKS[0] * s1 - LINKS[1] * s12, -LINKS[1] * s12],
                 [LINKS[0] * c1 + LINKS[1] * c12, LINKS[1] * c12]]
            )  # fmt: skip
            step = np.linalg.lstsq(jac, task.target - task.fingertip(), rcond=None)[0]
            _, reward, terminated, truncated, _ = env.step(np.clip(step / MAX_JOINT_STEP, -1, 1))
            total += float(reward)
            done = terminated or truncated
        returns.append(total)
    return float(np.mean(returns))


ZOO_RESULT = Path(__file__).resolve().parent / "zoo" / "cartpole-ppo.result.json"


def zoo_line() -> list[str]:
    """The shipped CartPole bundle's longer MiniConv run, for scale (empty if absent)."""
    if not ZOO_RESULT.exists():
        return []
    r = json.loads(ZOO_RESULT.read_text())
    return [
        f"For scale: the shipped `models/zoo/cartpole-ppo` (MiniConv, same PPO settings) "
        f"was trained for {r['timesteps']} steps and reached a final-100 return of "
        f"{r['final_100_mean_return']:.1f} (`{r['command']}`).",
        "",
    ]


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
    thin = [
        f"{t} / {a} / {e} ({len(c['seeds'])})"
        for (t, a, e), c in cells.items()
        if len(c["seeds"]) < 3
    ]
    lines = [
        "# Learning parity: split (MiniConv) vs Full-CNN policies",
        "",
        f"Generated by `{command}` from {len(results)} runs.",
        "",
        preamble or METHOD,
        "## Results",
        "",
        *results_table(cells),
        "",
        *(
            [
                f"Reference for reacher-pixels: a scripted controller reading the true state "
                f"(Jacobian step toward the target) returns {reacher_ik_return():.1f} on "
                "average over 100 episodes; random actions are in the table.",
                "",
            ]
            if any(t == "reacher-pixels" for t, _, _ in cells)
            else []
        ),
        *(zoo_line() if any(t == "cartpole-pixels" for t, _, _ in cells) else []),
        f"Cells with fewer than 3 seeds: {', '.join(thin)}."
        if thin
        else "Every cell has 3 or more seeds.",
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
