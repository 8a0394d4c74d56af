"""The learning-parity sweep: every task x encoder x seed through `splitedge train`, a few at a time.

Run: `python -m models.sweep --jobs 2` (resumable: cells with a result.json are skipped).
Each run is a `nice -n 19` subprocess with one torch thread, so the sweep shares a small
machine politely.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

# task -> (algorithm, env steps): sized so one run takes a few minutes on one busy core
PLAN: dict[str, tuple[str, int]] = {
    "cartpole-pixels": ("ppo", 500_000),
    "pendulum-pixels": ("sac", 10_000),
    "reacher-pixels": ("ddpg", 10_000),
}
ENCODER_ORDER = ("miniconv", "naturecnn", "miniconv-es2")


def commands(runs: Path, seeds: list[int], tasks: list[str]) -> list[tuple[Path, list[str]]]:
    """(run directory, argv) for every cell, seed-major so early stops still cover every cell."""
    out = []
    for seed in seeds:
        for task in tasks:
            algo, steps = PLAN[task]
            for encoder in ENCODER_ORDER:
                run_dir = runs / f"{task}-{algo}-{encoder}-s{seed}"
                argv = [
                    "splitedge", "train", "--task", task, "--algo", algo, "--encoder", encoder,
                    "--seed", str(seed), "--timesteps", str(steps), "--out", str(run_dir),
                    "--no-progress", "--json",
                ]  # fmt: skip
                out.append((run_dir, argv))
    return out


def main() -> int:
    """Run the sweep's missing cells, `--jobs` at a time."""
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--runs", type=Path, default=Path("runs/learning"))
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--tasks", nargs="+", default=list(PLAN))
    ap.add_argument("--jobs", type=int, default=2)
    args = ap.parse_args()
    todo = [(d, a) for d, a in commands(args.runs, args.seeds, args.tasks)]
    todo = [(d, a) for d, a in todo if not (d / "result.json").exists()]
    running: list[tuple[Path, subprocess.Popen[bytes], float]] = []
    while todo or running:
        while todo and len(running) < args.jobs:
            run_dir, argv = todo.pop(0)
            run_dir.mkdir(parents=True, exist_ok=True)
            log = (run_dir / "train.log").open("wb")
            cmd = ["nice", "-n", "19", sys.executable, "-m", "splitedge", *argv[1:]]
            running.append((run_dir, subprocess.Popen(cmd, stdout=log, stderr=log), time.time()))
            print(f"start {run_dir}: {' '.join(argv)}", flush=True)
        time.sleep(2)
        for item in list(running):
            run_dir, proc, t0 = item
            if proc.poll() is not None:
                running.remove(item)
                print(f"done  {run_dir} rc={proc.returncode} {time.time() - t0:.0f}s", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
