"""The closed loop on the device: observation -> encoder -> server -> action -> env.step."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from edge.client import PolicyClient
from edge.envs import make_policy_env
from edge.telemetry import StepRecord


@dataclass
class LoopResult:
    """What a closed-loop run did: per-step records and finished episodes' returns."""

    records: list[StepRecord] = field(default_factory=list)
    episode_returns: list[float] = field(default_factory=list)
    seconds: float = 0.0


def run_loop(
    client: PolicyClient,
    steps: int,
    seed: int = 0,
    env: Any = None,
    on_step: Callable[[int], None] | None = None,
    on_record: Callable[[StepRecord], None] | None = None,
    keep_records: bool = True,
    until: float | None = None,
) -> LoopResult:
    """Run `steps` decisions against the bundle's env (or a given one); never raises on link
    trouble. until: also stop at this time.perf_counter() value. keep_records=False keeps
    nothing per step (a long run's memory stays flat); on_record still sees every step."""
    env = env if env is not None else make_policy_env(client.bundle.policy, seed=seed)
    obs, _ = env.reset(seed=seed)
    client.start_episode()  # a delay-aware head's history starts afresh, as in training
    result, ep_return, episode = LoopResult(), 0.0, 0
    t0 = time.perf_counter()
    for i in range(steps):
        if until is not None and time.perf_counter() >= until:
            break
        action = client.act(obs)
        d = client.last
        assert d is not None
        obs, reward, terminated, truncated, _ = env.step(action)
        ep_return += reward
        record = StepRecord(
            step=i,
            encode_ms=d.encode_ms,
            rtt_ms=d.rtt_ms,
            server_queue_ms=d.server_queue_ms,
            server_compute_ms=d.server_compute_ms,
            total_ms=d.total_ms,
            bytes_up=d.bytes_up,
            bytes_down=d.bytes_down,
            fallback=d.fallback,
            reward=float(reward),
            error=d.error,
        )
        if keep_records:
            result.records.append(record)
        if on_record is not None:
            on_record(record)
        if terminated or truncated:
            result.episode_returns.append(ep_return)
            episode += 1
            ep_return = 0.0
            obs, _ = env.reset(seed=seed + episode)
            client.start_episode()
        if on_step is not None:
            on_step(i)
    result.seconds = time.perf_counter() - t0
    return result
