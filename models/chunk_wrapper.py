"""Train a head that answers each observation with the next H actions (action chunks).

The agent's action is one chunk: H of the env's Box actions, flattened into a Box of
H * n values (each action's bounds repeated), for the ticks from the observation's own.
How the chunk is played depends on whether a link delay is given:

- With a delay model (a link profile's round trip in ticks, models/delay_wrapper.py's
  LinkDelay): the env steps one tick per agent step, exactly as the device plays chunks.
  The chunk chosen at tick t arrives at t + d (d drawn per chunk) and from then on
  edge/chunks.py's ChunkPlayer, the device's own, plays the newest chunk's action for each
  tick: index d of a chunk first, the rest while no newer chunk comes (a late or lost
  reply), holding the last action past its end. Training runs the device's rule, so the
  head learns what each index will be used for. H must exceed the longest delay, or a
  chunk could run out before it is first played.
- Without one: open-loop macro-actions. One agent step plays all H actions (stopping at
  the episode's end) and returns the summed reward, so every index of the chunk is played
  and credited; played one tick at a time from the newest chunk, one step per tick and
  the delay 0, only index 0 would ever be used and the rest never trained.

The observation is the env's own. info gains `chunk_ticks` (ticks played this step) and,
with a delay, `applied_action_age` (ticks since the played chunk's observation).
"""

from __future__ import annotations

from typing import Any

import gymnasium
import numpy as np

from edge.chunks import ChunkPlayer
from models.delay_wrapper import DelayModel


class ChunkedActions(gymnasium.Wrapper):  # type: ignore[type-arg]
    """`env` driven by H-action chunks; see the module docstring for how they are played."""

    def __init__(
        self,
        env: gymnasium.Env,  # type: ignore[type-arg]
        chunk: int,
        delay: DelayModel | None = None,
        seed: int | None = None,
    ):
        super().__init__(env)
        act = env.action_space
        if not isinstance(act, gymnasium.spaces.Box):
            raise ValueError(
                f"action chunks need Box (continuous) actions, got {type(act).__name__}"
            )
        if chunk < 1:
            raise ValueError(f"chunk must be >= 1, got {chunk}")
        if delay is not None and chunk <= delay.max_ticks:
            raise ValueError(
                f"chunk {chunk} is not longer than the longest delay ({delay.max_ticks} ticks): "
                f"a chunk could run out before it is first played; use at least "
                f"{delay.max_ticks + 1}"
            )
        self.chunk, self.delay = chunk, delay
        self._tick_shape, self._dtype = act.shape, act.dtype
        self.action_space = gymnasium.spaces.Box(
            np.tile(act.low.reshape(-1), chunk),
            np.tile(act.high.reshape(-1), chunk),
            dtype=act.dtype,
        )
        self.default_action = np.clip(np.zeros(act.shape, act.dtype), act.low, act.high)
        self._rng = np.random.default_rng(seed)
        self._start_episode()

    def _start_episode(self) -> None:
        self._tick = 0
        self._in_flight: list[tuple[int, int, list[np.ndarray]]] = []  # (arrival, chosen, chunk)
        self._player = ChunkPlayer(self.default_action)

    def reset(self, *, seed: int | None = None, options: dict[str, Any] | None = None) -> Any:
        """Reset the env; chunks still in flight belong to the old episode and are dropped."""
        if seed is not None:
            self._rng = np.random.default_rng(seed)
        obs, info = self.env.reset(seed=seed, options=options)
        self._start_episode()
        return obs, info

    def _actions(self, action: Any) -> list[np.ndarray]:
        flat = np.asarray(action, self._dtype).reshape(self.chunk, -1)
        return [row.reshape(self._tick_shape) for row in flat]

    def step(self, action: Any) -> Any:
        """Play the chunk: open-loop over H ticks, or from its arrival tick (see above)."""
        actions = self._actions(action)
        if self.delay is None:
            total, ticks = 0.0, 0
            for a in actions:
                obs, reward, terminated, truncated, info = self.env.step(a)
                total, ticks = total + float(reward), ticks + 1
                if terminated or truncated:
                    break
            return obs, total, terminated, truncated, {**info, "chunk_ticks": ticks}
        tick, d = self._tick, int(self.delay.draw(self._rng))
        if not 0 <= d <= self.delay.max_ticks:
            raise ValueError(f"delay model drew {d} ticks, outside [0, {self.delay.max_ticks}]")
        self._in_flight.append((tick + d, tick, actions))
        for arrival, chosen, chunk in sorted(self._in_flight, key=lambda c: c[0]):
            if arrival <= tick:
                self._player.receive(chosen, chunk)  # an older one than the held is ignored
        self._in_flight = [c for c in self._in_flight if c[0] > tick]
        applied = self._player.play(tick)
        obs, reward, terminated, truncated, info = self.env.step(applied)
        self._tick += 1
        info = {**info, "chunk_ticks": 1, "applied_action_age": self._player.age}
        return obs, reward, terminated, truncated, info
