"""The latency-hiding study: plain vs delay-aware vs chunk policies, several seeds, one link.

Per seed and strategy: `splitedge train` (plain; `--delay-profile LINK`; `--chunk H
--delay-profile LINK`), `splitedge export`, then models/delay_eval.py under LINK's delay,
all the same way, so the three strategies are compared on equal terms. Each step is a
`nice -n 19` subprocess and is skipped when its output exists (resumable); `--jobs` runs
run side by side. Writes `<runs>/summary.json`: per strategy the seeds' mean returns
under the delay, for the statistics (IQM and intervals are computed elsewhere).

    python -m models.realtime_sweep --link 3g --chunk 8 --seeds 0 1 2 3 4 --jobs 2
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

STRATEGIES = ("plain", "delay-aware", "chunk")


def steps(
    runs: Path, args: argparse.Namespace, strategy: str, seed: int
) -> list[tuple[Path, list[str]]]:
    """(output that marks the step done, argv) for one run: train, export, evaluate."""
    run = runs / f"{args.task}-{args.algo}-{strategy}-s{seed}"
    flags = {
        "plain": [],
        "delay-aware": ["--delay-profile", args.link],
        "chunk": ["--chunk", str(args.chunk), "--delay-profile", args.link],
    }[strategy]
    links = ["--links-file", args.links_file] if args.links_file else []
    train = [
        "-m", "splitedge", "train", "--task", args.task, "--algo", args.algo, "--seed", str(seed),
        "--timesteps", str(args.timesteps), "--out", str(run), "--no-progress", "--json",
        *flags, *(links if flags else []),
    ]  # fmt: skip
    export = ["-m", "splitedge", "export", "--model", str(run / "model.zip"), "--out",
              str(run / "bundle"), "--json"]  # fmt: skip
    evaluate = ["-m", "models.delay_eval", "--bundle", str(run / "bundle"), "--link", args.link,
                "--episodes", str(args.episodes), *links]  # fmt: skip
    return [
        (run / "result.json", train),
        (run / "bundle" / "manifest.json", export),
        (run / "delay_eval.json", evaluate),
    ]


def run_chain(chain: list[tuple[Path, list[str]]]) -> int:
    """Run a run's missing steps in order, logging to its sweep.log; the evaluation's
    stdout is its output file."""
    run = chain[0][0].parent
    run.mkdir(parents=True, exist_ok=True)
    for done, argv in chain:
        if done.exists():
            continue
        cmd = ["nice", "-n", "19", sys.executable, *argv]
        with (run / "sweep.log").open("ab") as log:
            out = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=log, check=False)
            log.write(out.stdout)
        if out.returncode != 0:
            return out.returncode
        if done.name == "delay_eval.json":
            done.write_bytes(out.stdout)
    return 0


def summary(runs: Path, args: argparse.Namespace) -> dict[str, object]:
    """Per strategy, each finished seed's mean return under the link's delay."""
    out: dict[str, object] = {"link": args.link, "task": args.task, "chunk_length": args.chunk}
    for strategy in STRATEGIES:
        seeds = {}
        for seed in args.seeds:
            path = runs / f"{args.task}-{args.algo}-{strategy}-s{seed}" / "delay_eval.json"
            if path.exists():
                seeds[seed] = json.loads(path.read_text())["mean_return"]
        out[strategy] = seeds
    return out


def main() -> int:
    """Run the study's missing steps, `--jobs` runs at a time, then write summary.json.."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--runs", type=Path, default=Path("runs/realtime"))
    ap.add_argument("--task", default="pendulum-pixels")
    ap.add_argument("--algo", default="sac")
    ap.add_argument("--link", default="3g")
    ap.add_argument("--links-file", default=None)
    ap.add_argument("--chunk", type=int, default=8)
    ap.add_argument("--timesteps", type=int, default=10_000)
    ap.add_argument("--episodes", type=int, default=20)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    ap.add_argument("--jobs", type=int, default=2)
    args = ap.parse_args()
    chains = [steps(args.runs, args, s, seed) for seed in args.seeds for s in STRATEGIES]
    todo = [c for c in chains if not c[-1][0].exists()]

    def run(chain: list[tuple[Path, list[str]]]) -> None:
        t0, where = time.time(), chain[0][0].parent
        print(f"start {where}", flush=True)
        code = run_chain(chain)  # the work is in subprocesses: threads only wait on them
        print(f"done  {where} rc={code} {time.time() - t0:.0f}s", flush=True)

    with ThreadPoolExecutor(args.jobs) as pool:
        list(pool.map(run, todo))
    result = summary(args.runs, args)
    (args.runs / "summary.json").write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
