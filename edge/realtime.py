"""The closed loop in real time: the world moves on a clock and never waits for the server.

Tick k is due at t0 + k * period. At each tick the device
1. sends the observation of tick k (never waiting for its reply),
2. takes the replies that have arrived by now (polled before and after sending) and keeps
   the newest one, the answer to the latest observation; a reply overtaken by a newer one
   on the link is not applied,
3. applies the newest action it holds, held over from earlier ticks when nothing newer
   came, and steps the env to tick k + 1.
Before the first reply of an episode it applies the default action (the client's fallback:
0 for discrete actions, zeros clipped into the bounds for continuous ones). A new episode
drops the held action: replies to the old episode's observations are not applied.

An action's age is the ticks between the observation it answered and the tick it is
applied at; a reply that took 1.5 periods is 2 ticks old when first applied. A tick is
stale when its action is at least 1 tick old or is the default action (which answers
no observation). At most max_in_flight requests are outstanding: a tick beyond that sends
nothing (counted in `unsent`), so a link too slow for the rate gives old actions instead
of an unbounded queue. After the last tick the loop waits up to drain_s for replies still
in flight, for their latency only. The clock is injectable so tests run in exact ticks.

Two bundles hide the link's latency (policy.realtime, splitedge/realtime_spec.py): a
delay-aware head reads, with each observation, the actions chosen for the ticks before
it: the device sends them as far as it knows them (edge/history.py), or, for a bundle
whose server keeps them, sends the observation's tick in its episode and the server fills
them from its own answers (server/stream_history.py); a chunking head answers H actions,
which edge/chunks.py's ChunkPlayer plays from the newest chunk (replace, not blend), the
age then being the ticks since the played chunk's observation.
"""

from __future__ import annotations

import math
import secrets
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from edge.chunks import ChunkPlayer
from edge.history import ActionHistory
from edge.telemetry import StepRecord


class Clock(Protocol):
    """Seconds on a monotonic clock; sleep_until returns at or after `t`."""

    def now(self) -> float: ...

    def sleep_until(self, t: float) -> None: ...


class WallClock:
    """time.perf_counter, the clock the device client stamps reply arrivals with."""

    def now(self) -> float:
        return time.perf_counter()

    def sleep_until(self, t: float) -> None:
        left = t - time.perf_counter()
        if left > 0:
            time.sleep(left)


@dataclass
class Sent:
    """A request on its way: `step` is the id its reply carries back."""

    step: int
    encode_ms: float = 0.0
    bytes_up: int = 0


@dataclass
class Reply:
    """A reply that arrived: its request's step, the action, and when (the clock's seconds)."""

    step: int
    action: Any
    arrived: float
    server_queue_ms: float = 0.0
    server_compute_ms: float = 0.0
    bytes_down: int = 0
    chunk: list[Any] | None = None  # a chunking head's H actions, from the observation's tick


class StreamingPolicy(Protocol):
    """What the loop needs of a client (edge.client.PolicyClient has it)."""

    @property
    def default_action(self) -> Any: ...

    # None: not connected, nothing sent; actions_in_flight only for a delay-aware bundle
    # whose device sends them, tick and episode (wire ids) for one whose server keeps them
    def send(
        self, frame: Any, actions_in_flight: list[Any] | None = None, tick: int = 0,
        episode: int = 0,
    ) -> Sent | None: ...  # fmt: skip

    def poll(self) -> list[Reply]: ...  # arrived since the last poll; never waits


@dataclass
class _Pending:
    tick: int
    episode: int
    sent_at: float
    sent: Sent


@dataclass
class RealtimeResult:
    """Per tick the applied action's age (None: the default action), per request a record
    (total_ms: send to reply; fallback: no reply by the end), and the episodes' returns."""

    ages: list[int | None] = field(default_factory=list)
    records: list[StepRecord] = field(default_factory=list)
    episode_returns: list[float] = field(default_factory=list)
    partial_return: float = 0.0  # of the episode still running at the last tick
    overruns: int = 0  # ticks that began a whole period or more after they were due
    unsent: int = 0  # ticks that sent nothing (max_in_flight reached, or not connected)
    strategy: str = "hold"  # how the bundle hides latency (RealtimeSpec.describe())

    def as_dict(self) -> dict[str, Any]:
        """Plain data for a worker's report (the records go separately)."""
        return {
            "ages": self.ages,
            "episode_returns": self.episode_returns,
            "partial_return": self.partial_return,
            "overruns": self.overruns,
            "unsent": self.unsent,
            "strategy": self.strategy,
        }


def declared_rate_hz(env: Any) -> float | None:
    """The control rate an env declares by its step length (`dt`, as Pendulum and MuJoCo
    envs, or `tau`, as CartPole), looked up through wrappers; None when it declares none."""
    inner = getattr(env, "unwrapped", env)
    for name in ("dt", "tau"):
        value = getattr(inner, name, None)
        if isinstance(value, (int, float)) and not isinstance(value, bool) and value > 0:
            return 1.0 / float(value)
    return None


def run_realtime(
    policy: StreamingPolicy,
    env: Any,
    period_s: float,
    ticks: int,
    seed: int = 0,
    clock: Clock | None = None,
    max_in_flight: int = 64,
    drain_s: float = 0.0,
    on_tick: Callable[[int], None] | None = None,
) -> RealtimeResult:
    """Run `ticks` ticks of `period_s` against `env`; never blocks on a reply."""
    if period_s <= 0 or ticks < 1 or max_in_flight < 1:
        raise ValueError(
            f"need period_s > 0, ticks >= 1, max_in_flight >= 1; got {period_s}, {ticks}, "
            f"{max_in_flight}"
        )
    clock = clock or WallClock()
    result = RealtimeResult()
    pending: dict[int, _Pending] = {}
    default = policy.default_action
    held, held_from = default, None  # the action applied and its observation's tick
    episode, ep_return = 0, 0.0
    spec = getattr(policy, "realtime", None)  # a bundle's latency hiding (None: plain)
    depth = spec.action_history if spec is not None else 0
    server_kept = bool(spec is not None and spec.server_history)
    history = ActionHistory(depth, default) if depth and not server_kept else None
    # a server-kept history is keyed by (episode, tick) on the stream: ids unique to this
    # run, so a second run on the same stream never reads the first one's answers
    run_id, ep_start = secrets.randbits(31) << 20, 0
    player = ChunkPlayer(default) if spec is not None and spec.chunk_length > 1 else None
    if spec is not None:
        result.strategy = spec.describe()
    obs, _ = env.reset(seed=seed)

    def collect() -> None:
        nonlocal held, held_from
        for reply in policy.poll():
            p = pending.pop(reply.step, None)
            if p is None:
                continue  # not sent by this loop (a warm-up decision's late reply)
            result.records.append(_answered(p, reply))
            if p.episode != episode:
                continue
            if history is not None:
                history.chosen(p.tick, reply.action)
            if player is not None:
                player.receive(p.tick, reply.chunk or [reply.action])
            elif held_from is None or p.tick > held_from:
                held, held_from = reply.action, p.tick

    t0 = clock.now()
    for k in range(ticks):
        due = t0 + k * period_s
        clock.sleep_until(due)
        if clock.now() - due >= period_s:
            result.overruns += 1
        collect()  # first, so replies that came free slots for this tick's request
        sent_at = clock.now()
        sent = None
        if len(pending) < max_in_flight:
            if history is not None:
                sent = policy.send(obs, history.window(k, held))
            elif server_kept:
                sent = policy.send(obs, tick=k - ep_start + 1, episode=run_id + episode + 1)
            else:
                sent = policy.send(obs)
        if sent is None:
            result.unsent += 1
        else:
            pending[sent.step] = _Pending(k, episode, sent_at, sent)
        collect()
        if player is not None:
            held = player.play(k)
            result.ages.append(player.age)
        else:
            result.ages.append(None if held_from is None else k - held_from)
        obs, reward, terminated, truncated, _ = env.step(held)
        ep_return += float(reward)
        if terminated or truncated:
            result.episode_returns.append(ep_return)
            episode, ep_return = episode + 1, 0.0
            obs, _ = env.reset(seed=seed + episode)
            held, held_from, ep_start = default, None, k + 1
            if history is not None:
                history.start_episode(k + 1)
            if player is not None:
                player.reset()
        if on_tick is not None:
            on_tick(k)
    result.partial_return = ep_return
    end = clock.now() + drain_s
    while pending and clock.now() < end:
        clock.sleep_until(min(clock.now() + period_s, end))
        collect()
    for p in pending.values():
        result.records.append(_unanswered(p))
    result.records.sort(key=lambda r: r.step)
    return result


def _answered(p: _Pending, reply: Reply) -> StepRecord:
    total = (reply.arrived - p.sent_at) * 1e3
    return StepRecord(
        step=p.sent.step, encode_ms=p.sent.encode_ms, rtt_ms=total - p.sent.encode_ms,
        server_queue_ms=reply.server_queue_ms, server_compute_ms=reply.server_compute_ms,
        total_ms=total, bytes_up=p.sent.bytes_up, bytes_down=reply.bytes_down, fallback=False,
    )  # fmt: skip


def _unanswered(p: _Pending) -> StepRecord:
    return StepRecord(
        step=p.sent.step, encode_ms=p.sent.encode_ms, rtt_ms=0.0, server_queue_ms=0.0,
        server_compute_ms=0.0, total_ms=0.0, bytes_up=p.sent.bytes_up, bytes_down=0,
        fallback=True, error="no reply by the end of the run",
    )  # fmt: skip


def nearest_rank(values: Sequence[int], q: float) -> int:
    """The q-th percentile as a value that occurred: the smallest with at least q% at or below."""
    ordered = sorted(values)
    return ordered[max(0, math.ceil(q / 100 * len(ordered)) - 1)]


def age_summary(ages: Sequence[int | None]) -> dict[str, Any]:
    """Action age per tick -> p50/p95/max (nearest rank), histogram, default ticks, stale share."""
    known = [a for a in ages if a is not None]
    hist: dict[str, int] = {}
    for a in sorted(known):
        hist[str(a)] = hist.get(str(a), 0) + 1
    stale = sum(1 for a in ages if a is None or a >= 1)
    return {
        "ticks": len(ages),
        "age_p50": nearest_rank(known, 50) if known else None,
        "age_p95": nearest_rank(known, 95) if known else None,
        "age_max": max(known) if known else None,
        "age_hist": hist,
        "default_ticks": len(ages) - len(known),
        "stale_share": stale / len(ages) if ages else float("nan"),
    }
