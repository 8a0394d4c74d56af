"""Train for a slow link: the agent's actions reach the env d ticks late, as on a device.

Each step the agent's action sets off; it arrives d ticks later, d drawn per step from the
link's round trip in ticks (ceil(round trip / control period)), jitter included. At each
tick the env applies the newest action that has arrived (newest by the tick it was chosen
at; an older one overtaken on the link is dropped), holds the previous one when none has,
and applies the default action before any has arrived in the episode: the rule
edge/realtime.py's loop follows on the device, so training sees what deployment will.

The observation gains the last d_max actions the agent chose, oldest first, padded with
the default action at an episode's start: the ones that may still be in flight, so the
policy can know what it has already committed to. With `history="known"` each of them
that has not arrived by the observation's tick is replaced by the newest action that has
(the one being held; the default before any): what a device can tell a split policy's
head, since a reply still on its way down holds the only copy (edge/history.py). Training
for a real deployment uses "known"; "chosen" is the full information, for comparison.

- Observations: Box (flattened, the actions appended, float32) or Dict (an
  "actions_in_flight" key of shape (d_max, action size) added); others are refused.
- Actions: Discrete (one-hot in the observation) or Box (its values); others are refused.
- Default action: Discrete's first action (0 unless it starts elsewhere), a Box's zeros
  clipped into its bounds: the device client's fallback before any reply.
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass
from typing import Any, Protocol

import gymnasium
import numpy as np

from deploy.link.profiles import LinkProfile

IN_FLIGHT_KEY = "actions_in_flight"
HISTORIES = ("chosen", "known")


class DelayModel(Protocol):
    """Ticks of delay per action: at most `max_ticks`, drawn by `draw(rng)`."""

    @property
    def max_ticks(self) -> int: ...

    def draw(self, rng: np.random.Generator) -> int: ...


@dataclass(frozen=True)
class LinkDelay:
    """A link's round trip in control ticks: each one-way delay uniform in
    [rtt/2 - jitter, rtt/2 + jitter] (as LinkProfile's jitter), plus a fixed extra_ms
    (serialisation, encoding, server compute: none by default), rounded up to whole ticks."""

    period_s: float
    rtt_ms: float
    jitter_ms: float = 0.0
    extra_ms: float = 0.0

    def __post_init__(self) -> None:
        if not self.period_s > 0:
            raise ValueError(f"period_s must be > 0, got {self.period_s}")
        if self.rtt_ms < 0 or self.extra_ms < 0:
            raise ValueError(
                f"rtt_ms and extra_ms must be >= 0, got {self.rtt_ms}, {self.extra_ms}"
            )
        if not 0 <= self.jitter_ms <= self.rtt_ms / 2:
            raise ValueError(
                f"jitter_ms must be in [0, rtt_ms / 2] = [0, {self.rtt_ms / 2}], got {self.jitter_ms}"
            )

    @classmethod
    def from_profile(
        cls, profile: LinkProfile, period_s: float, extra_ms: float = 0.0
    ) -> LinkDelay:
        """The delay of a link profile's round trip (deploy/link/profiles.py)."""
        return cls(period_s, profile.rtt_ms, profile.jitter_ms, extra_ms)

    def _ticks(self, ms: float) -> int:
        # a round trip of exactly k periods is k ticks, not k + 1 from a rounding error
        return max(0, math.ceil(ms / (self.period_s * 1e3) - 1e-9))

    @property
    def max_ticks(self) -> int:
        """The longest delay in ticks: both one-way delays at their most."""
        return self._ticks(self.rtt_ms + 2 * self.jitter_ms + self.extra_ms)

    def draw(self, rng: np.random.Generator) -> int:
        """One action's delay in ticks."""
        one_way = self.rtt_ms / 2
        up, down = rng.uniform(one_way - self.jitter_ms, one_way + self.jitter_ms, size=2)
        return self._ticks(float(up + down) + self.extra_ms)


def default_action(space: gymnasium.Space) -> Any:  # type: ignore[type-arg]
    """The action before any reply: Discrete's first, a Box's zeros clipped into its bounds."""
    if isinstance(space, gymnasium.spaces.Discrete):
        return int(space.start)
    return np.clip(np.zeros(space.shape, space.dtype), space.low, space.high)  # type: ignore[arg-type]


class DelayedActions(gymnasium.Wrapper):  # type: ignore[type-arg]
    """`env` whose actions arrive `delay.draw()` ticks late, with the in-flight actions
    appended to its observation. info gains `action_delay_ticks` (this action's delay) and
    `applied_action_age` (ticks since the applied action was chosen; None: the default)."""

    def __init__(
        self,
        env: gymnasium.Env,  # type: ignore[type-arg]
        delay: DelayModel,
        seed: int | None = None,
        history: str = "chosen",
    ):
        super().__init__(env)
        if history not in HISTORIES:
            raise ValueError(f"history must be one of {HISTORIES}, got {history!r}")
        self.delay, self.d_max, self.history = delay, int(delay.max_ticks), history
        self._rng = np.random.default_rng(seed)
        act = env.action_space
        if isinstance(act, gymnasium.spaces.Discrete):
            self._width, low, high = int(act.n), np.zeros(int(act.n)), np.ones(int(act.n))
        elif isinstance(act, gymnasium.spaces.Box):
            low, high = act.low.reshape(-1), act.high.reshape(-1)
            self._width = low.size
        else:
            raise ValueError(
                f"DelayedActions takes Discrete or Box actions, got {type(act).__name__}"
            )
        self.default_action: Any = default_action(act)
        flight_low = np.tile(low, self.d_max).astype(np.float32)
        flight_high = np.tile(high, self.d_max).astype(np.float32)
        obs = env.observation_space
        if isinstance(obs, gymnasium.spaces.Box):
            self.observation_space = gymnasium.spaces.Box(
                np.concatenate([obs.low.reshape(-1), flight_low]).astype(np.float32),
                np.concatenate([obs.high.reshape(-1), flight_high]).astype(np.float32),
                dtype=np.float32,
            )
        elif isinstance(obs, gymnasium.spaces.Dict) and IN_FLIGHT_KEY not in obs.spaces:
            flight = gymnasium.spaces.Box(
                flight_low.reshape(self.d_max, self._width),
                flight_high.reshape(self.d_max, self._width),
                dtype=np.float32,
            )
            self.observation_space = gymnasium.spaces.Dict({**obs.spaces, IN_FLIGHT_KEY: flight})
        else:
            raise ValueError(
                f"DelayedActions takes Box or Dict observations (a Dict without an "
                f"{IN_FLIGHT_KEY!r} key), got {obs}"
            )
        self._start_episode()

    def _start_episode(self) -> None:
        self._tick = 0
        self._in_flight: list[tuple[int, int, Any]] = []  # (arrival tick, chosen tick, action)
        self._held, self._held_from = self.default_action, -1
        # (chosen tick, arrival tick, action); negative ticks: before the episode, the default
        before = [(-1 - i, -1, self.default_action) for i in reversed(range(self.d_max))]
        self._chosen: deque[tuple[int, int, Any]] = deque(before, maxlen=self.d_max)

    def reset(self, *, seed: int | None = None, options: dict[str, Any] | None = None) -> Any:
        """Reset the env; actions still in flight belong to the old episode and are dropped."""
        if seed is not None:
            self._rng = np.random.default_rng(seed)
        obs, info = self.env.reset(seed=seed, options=options)
        self._start_episode()
        return self._observe(obs), info

    def step(self, action: Any) -> Any:
        """Send `action`; apply the newest arrived one (or hold) for this tick."""
        tick, d = self._tick, int(self.delay.draw(self._rng))
        if not 0 <= d <= self.d_max:
            raise ValueError(f"delay model drew {d} ticks, outside [0, max_ticks={self.d_max}]")
        self._in_flight.append((tick + d, tick, action))
        arrived = [a for a in self._in_flight if a[0] <= tick]
        self._in_flight = [a for a in self._in_flight if a[0] > tick]
        if arrived:
            _, chosen, newest = max(arrived, key=lambda a: a[1])
            if chosen > self._held_from:
                self._held, self._held_from = newest, chosen
        self._chosen.append((tick, tick + d, action))
        obs, reward, terminated, truncated, info = self.env.step(self._held)
        info = {
            **info,
            "action_delay_ticks": d,
            "applied_action_age": tick - self._held_from if self._held_from >= 0 else None,
        }
        self._tick += 1
        return self._observe(obs), reward, terminated, truncated, info

    def _encode(self, action: Any) -> np.ndarray:
        if isinstance(self.env.action_space, gymnasium.spaces.Discrete):
            hot = np.zeros(self._width, np.float32)
            hot[int(action) - int(self.env.action_space.start)] = 1.0
            return hot
        return np.asarray(action, np.float32).reshape(-1)

    def _window(self) -> list[Any]:
        """The history the observation of the coming tick carries (see the module docstring)."""
        if self.history == "chosen":
            return [a for _, _, a in self._chosen]
        now = self._tick  # the tick whose observation this is
        fill, fill_from = self._held, self._held_from
        for arrival, chosen, action in self._in_flight:  # arriving by now: the device has it
            if arrival <= now and chosen > fill_from:
                fill, fill_from = action, chosen
        return [a if arrival <= now else fill for _, arrival, a in self._chosen]

    def _observe(self, obs: Any) -> Any:
        flight = np.zeros((self.d_max, self._width), np.float32)
        for i, a in enumerate(self._window()):
            flight[i] = self._encode(a)
        if isinstance(self.observation_space, gymnasium.spaces.Dict):
            return {**obs, IN_FLIGHT_KEY: flight}
        flat = np.asarray(obs, np.float32).reshape(-1)
        return np.concatenate([flat, flight.reshape(-1)])
