"""The latency-hiding study: plain vs delay-aware vs chunk policies, several seeds and links.

Per seed: one plain policy (`splitedge train`, `splitedge export`), scored by
models/delay_eval.py turn by turn (`sync`) and, per link, holding the newest action under
the link's delay (`hold`). Per seed and link: a delay-aware policy (`--delay-profile
LINK`) and a chunking one (`--chunk H --delay-profile LINK`, H one more than the link's
longest delay in ticks unless --chunk says), trained, exported and scored under that
link's delay. Per seed and link also a delay-aware policy distilled from that seed's
plain one (`--delay-profile LINK --distill-from PLAIN`, models/delay_distill.py), and the
plain policy's ceiling on the link: turn by turn, but acting only from the tick its first
reply could arrive (`delay_eval --ceiling`), the most any strategy can keep there. Every
score is the same deterministic delay_eval, so the strategies compare on equal terms. Each step is a `nice -n 19` subprocess, skipped when its output exists
(resumable); `--jobs` chains run side by side. Writes `<runs>/summary.json` (per task and
link: each strategy's per-seed mean return, plus sync and random) for
deploy/realtime_study.py's statistics.

    python -m models.realtime_sweep --task pendulum-pixels --algo sac \\
        --links wifi dsl 3g satellite --seeds 0 1 2 3 4 --jobs 2
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

STRATEGIES = ("hold", "delay-aware", "chunk", "distilled")
Step = tuple[Path, list[str]]  # (output that marks the step done, argv)


def link_ticks(
    task: str, link: str, links_file: str | None, control_hz: float | None = None
) -> tuple[float, int]:
    """(control Hz, the link's longest delay in ticks) as training computes them."""
    from deploy.link.profiles import get_profile
    from edge.envs import make_env
    from edge.realtime import declared_rate_hz
    from models.delay_wrapper import LinkDelay
    from models.realtime_training import DELAY_EXTRA_MS

    hz = control_hz or declared_rate_hz(make_env(task))
    if hz is None:
        raise SystemExit(f"realtime_sweep: {task} declares no control rate; pass --control-hz")
    delay = LinkDelay.from_profile(get_profile(link, links_file), 1.0 / hz, DELAY_EXTRA_MS)
    return hz, delay.max_ticks


def run_dir(runs: Path, args: argparse.Namespace, strategy: str, link: str, seed: int) -> Path:
    """The plain policy is one per seed; the others one per seed and link."""
    if strategy == "hold":
        return runs / f"{args.task}-{args.algo}-plain-s{seed}"
    return runs / f"{args.task}-{args.algo}-{strategy}-{link}-s{seed}"


def chain(
    runs: Path, args: argparse.Namespace, strategy: str, link: str, seed: int, chunk: int
) -> list[Step]:
    """Train, export, then score under `link`; the plain policy (one chain per seed, so no
    two chains train it at once) is scored sync and under every link."""
    run = run_dir(runs, args, strategy, link, seed)
    links = ["--links-file", args.links_file] if args.links_file else []
    rate = ["--control-hz", str(args.control_hz)] if args.control_hz else []
    flags = {
        "hold": [],
        "delay-aware": ["--delay-profile", link, *links, *rate],
        "chunk": ["--chunk", str(chunk), "--delay-profile", link, *links, *rate],
        "distilled": ["--delay-profile", link, *links, *rate, "--distill-from",
                      str(run_dir(runs, args, "hold", link, seed))],
    }[strategy]  # fmt: skip
    steps = args.distill_timesteps if strategy == "distilled" else args.timesteps
    train = [
        "-m", "splitedge", "train", "--task", args.task, "--algo", args.algo, "--seed", str(seed),
        "--timesteps", str(steps), "--out", str(run), "--no-progress", "--json", *flags,
    ]  # fmt: skip
    export = ["-m", "splitedge", "export", "--model", str(run / "model.zip"), "--out",
              str(run / "bundle"), "--json"]  # fmt: skip

    def score(where: str) -> Step:
        argv = ["-m", "models.delay_eval", "--bundle", str(run / "bundle"), "--link", where,
                "--episodes", str(args.episodes), *links, *rate]  # fmt: skip
        return run / f"delay_eval-{where}.json", argv

    out = [(run / "result.json", train), (run / "bundle" / "manifest.json", export)]
    if strategy == "hold":
        ceilings = [
            (run / f"delay_eval-ceiling-{where}.json", [*score(where)[1], "--ceiling"])
            for where in args.links
        ]
        return out + [score(where) for where in ("sync", *args.links)] + ceilings
    return out + [score(link)]


def run_chain(steps: list[Step]) -> int:
    """Run a chain's missing steps in order, logging to its run's sweep.log; a score's
    stdout is its output file."""
    run = steps[0][0].parent
    run.mkdir(parents=True, exist_ok=True)
    for done, argv in steps:
        if done.exists():
            continue
        cmd = ["nice", "-n", "19", sys.executable, *argv]
        with (run / "sweep.log").open("ab") as log:
            out = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=log, check=False)
            log.write(out.stdout)
        if out.returncode != 0:
            return out.returncode
        if done.name.startswith("delay_eval"):
            done.write_bytes(out.stdout)
    return 0


def _mean_return(path: Path) -> float | None:
    return json.loads(path.read_text())["mean_return"] if path.exists() else None


def summary(runs: Path, args: argparse.Namespace, ticks: dict[str, int], hz: float) -> dict:
    """Per link and strategy, each finished seed's mean return; sync and random per seed."""
    out: dict[str, Any] = {"task": args.task, "algo": args.algo, "control_hz": hz,
                           "timesteps": args.timesteps, "episodes": args.episodes,
                           "distill_timesteps": args.distill_timesteps}  # fmt: skip
    plain = {s: run_dir(runs, args, "hold", "", s) for s in args.seeds}
    out["sync"] = {s: _mean_return(p / "delay_eval-sync.json") for s, p in plain.items()}
    out["random"] = {
        s: json.loads((p / "result.json").read_text())["random_policy_mean_return"]
        for s, p in plain.items()
        if (p / "result.json").exists()
    }
    out["links"] = {}
    for link in args.links:
        cell: dict[str, Any] = {
            "delay_ticks_max": ticks[link],
            "chunk_length": _chunk(args, ticks[link]),
        }
        for strategy in STRATEGIES:
            cell[strategy] = {
                s: _mean_return(run_dir(runs, args, strategy, link, s) / f"delay_eval-{link}.json")
                for s in args.seeds
            }
        cell["ceiling"] = {  # the plain policy, acting only from the first reply's tick on
            s: _mean_return(p / f"delay_eval-ceiling-{link}.json") for s, p in plain.items()
        }
        # who kept the RL delay-aware runs' history ("known": the device, "server")
        cell["delay-aware-history"] = sorted({
            h for s in args.seeds
            if (h := _history(run_dir(runs, args, "delay-aware", link, s))) is not None
        })  # fmt: skip
        out["links"][link] = cell
    return out


def _history(run: Path) -> str | None:
    path = run / "result.json"
    if not path.exists():
        return None
    return (json.loads(path.read_text()).get("realtime") or {}).get("history")


def _chunk(args: argparse.Namespace, max_ticks: int) -> int:
    return args.chunk if args.chunk else max_ticks + 1


def main() -> int:
    """Run the study's missing steps, `--jobs` chains at a time, then write summary.json."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--runs", type=Path, default=Path("runs/realtime"))
    ap.add_argument("--task", default="pendulum-pixels")
    ap.add_argument("--algo", default="sac")
    ap.add_argument("--links", nargs="+", default=["3g"])
    ap.add_argument("--links-file", default=None)
    ap.add_argument("--control-hz", type=float, default=None, help="default: the env's own rate")
    ap.add_argument("--strategies", nargs="+", default=list(STRATEGIES), choices=STRATEGIES)
    ap.add_argument("--chunk", type=int, default=0, help="default: each link's max delay + 1")
    ap.add_argument("--timesteps", type=int, default=10_000)
    ap.add_argument(
        "--distill-timesteps", type=int, default=24_000, help="env steps of a distillation"
    )
    ap.add_argument("--episodes", type=int, default=20)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    ap.add_argument("--jobs", type=int, default=2)
    ap.add_argument("--summary-only", action="store_true", help="run nothing, write summary.json")
    args = ap.parse_args()
    runs = args.runs / f"{args.task}-{args.algo}"
    hz, ticks = 0.0, {}
    for link in args.links:
        hz, ticks[link] = link_ticks(args.task, link, args.links_file, args.control_hz)
    # plain chains first, then link by link
    chains = [
        chain(runs, args, strategy, link, seed, _chunk(args, ticks[link]))
        for strategy in args.strategies
        for link in (args.links[:1] if strategy == "hold" else args.links)
        for seed in args.seeds
    ]
    todo = [] if args.summary_only else [c for c in chains if not all(d.exists() for d, _ in c)]
    # the plain chains first, all of them: a distilled chain's teacher is its seed's plain run
    plain = {run_dir(runs, args, "hold", "", seed) for seed in args.seeds}
    first = [c for c in todo if c[0][0].parent in plain]

    def run(steps: list[Step]) -> None:
        t0, where = time.time(), steps[-1][0]
        print(f"start {where}", flush=True)
        code = run_chain(steps)  # the work is in subprocesses: threads only wait on them
        print(f"done  {where} rc={code} {time.time() - t0:.0f}s", flush=True)

    with ThreadPoolExecutor(args.jobs) as pool:
        list(pool.map(run, first))
    with ThreadPoolExecutor(args.jobs) as pool:
        list(pool.map(run, [c for c in todo if c not in first]))
    result = summary(runs, args, ticks, hz)
    (runs / "summary.json").write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
