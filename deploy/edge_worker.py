"""One edge client process for deploy.clients.ClientGroup: `python -m deploy.edge_worker`.

Reads one JSON job line on stdin, enters the edge network namespace if the job names one
(before any socket exists), connects and warms up, prints {"event": "ready"}, waits for a
`go` line, runs the closed loop (a number of steps, or for duration_s seconds), and prints
{"event": "done", "records": [...]}. One JSON object per line on stdout; {"event": "step"}
after each timed step. With loop "realtime" the env ticks at control_hz and never waits
for a reply (edge.realtime); its ages and returns come back in extra["realtime"]. With sysmon_s > 0 it samples its own CPU, RSS and the device's
temperatures and throttling (edge.sysmon) while it runs.
"""

from __future__ import annotations

import json
import signal
import sys
import time
from typing import Any

from deploy.link.netns import die_with_parent, enter


def _say(**event: Any) -> None:
    sys.stdout.write(json.dumps(event) + "\n")
    sys.stdout.flush()


def main() -> int:
    """Run the job read from stdin; report by JSON lines on stdout."""
    die_with_parent()
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's to handle
    job = json.loads(sys.stdin.readline())
    if job.get("netns"):
        enter(job["netns"])
    try:
        return _run(job)
    except Exception as e:  # reported to the parent as one line; it decides what to do
        _say(event="error", message=f"{type(e).__name__}: {e}")
        return 1


def _run(job: dict[str, Any]) -> int:
    from edge.agent import run_loop
    from edge.client import ClientConfig, PolicyClient
    from edge.envs import make_policy_env
    from edge.telemetry import WindowedLatency
    from splitedge.bundle import load_bundle

    bundle = load_bundle(job["bundle"])
    env = make_policy_env(bundle.policy, job.get("env"), job.get("env_kwargs"))
    client = PolicyClient(
        bundle,
        ClientConfig(
            server=job["server"],
            mode=job["mode"],
            backend=job.get("backend", "auto"),
            rpc=job.get("rpc", "stream"),
            deadline_s=job.get("deadline_s", 10.0),
            client_id=job.get("client_id", ""),
        ),
    )
    seed = int(job.get("seed", 0)) + 1000 * int(job.get("index", 0))
    with client.connect():
        if job.get("warmup"):
            run_loop(client, job["warmup"], seed=seed + 999, env=env)
        _say(event="ready")
        if sys.stdin.readline().strip() != "go":
            return 0  # the parent gave up on this cell
        sampler = _start_sysmon(job.get("sysmon_s", 0.0))
        t0 = time.perf_counter()
        stamps: list[float] = []

        def step(i: int) -> None:
            stamps.append(time.perf_counter() - t0)
            _say(event="step")

        records: list[Any] = []
        extra: dict[str, Any] = {}
        if job.get("duration_s"):  # a soak: per-window stats only, memory flat over the run
            n = int(job.get("windows", 6))
            acc = WindowedLatency(job["duration_s"] / n, n)

            def window(rec: Any) -> None:
                acc.add(time.perf_counter() - t0, rec.total_ms, rec.fallback)

            run_loop(client, sys.maxsize, seed=seed, env=env, on_step=lambda i: _say(event="step"),
                     on_record=window, keep_records=False, until=t0 + job["duration_s"])  # fmt: skip
            seconds = time.perf_counter() - t0
            extra["windows"] = acc.finish(seconds)
        elif job.get("loop") == "realtime":
            from edge.realtime import run_realtime

            rt = run_realtime(client, env, 1.0 / job["control_hz"], job["steps"], seed=seed,
                              drain_s=job.get("deadline_s", 10.0), on_tick=step)  # fmt: skip
            records, seconds = rt.records, time.perf_counter() - t0
            extra["realtime"], extra["t_s"] = rt.as_dict(), stamps
        else:
            result = run_loop(client, job["steps"], seed=seed, env=env, on_step=step)
            records, seconds = result.records, time.perf_counter() - t0
            extra["t_s"] = stamps
            extra["episode_returns"] = result.episode_returns
            # the episode still running when the loop stopped: all reward not in a finished one
            extra["partial_return"] = sum(r.reward for r in records) - sum(result.episode_returns)
        if sampler is not None:
            sampler.stop()
            extra["sysmon"] = [s.as_dict() for s in sampler.samples]
            extra["sysmon_sources"] = sampler.sources
    _say(
        event="done",
        records=[r.as_dict() for r in records],
        seconds=seconds,
        encoder=client.encoder_reason or "none (raw mode)",
        extra=extra,
    )
    return 0


def _start_sysmon(interval_s: float) -> Any:
    if not interval_s:
        return None
    from edge.sysmon import Sampler

    return Sampler(interval_s=interval_s).start()


if __name__ == "__main__":
    sys.exit(main())
