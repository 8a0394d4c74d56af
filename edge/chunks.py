"""Action chunks on the device: the head answers one observation with the next H actions.

A chunk made from the observation of tick j holds the actions for ticks j, j+1, ..., j+H-1.
The device plays the action of the current tick from the newest chunk it holds, so a reply
that arrives d ticks late still has H-d actions planned for the ticks to come. A newer
chunk (one made from a later observation) replaces the rest of the older one from the
tick it is first played; an older chunk arriving late is ignored. A tick no chunk covers
(the newest one ran out, or none has arrived yet) holds the last action played, or the
default action before any.

Why replace rather than blend: the two chunks are plans made from different states, and
the newer one saw more of the world. Averaging them (as temporal ensembling does) gives an
action that neither plan chose; for a multi-modal task (go left or right around an
obstacle) the average is the obstacle. Blending is not offered here.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any


class ChunkPlayer:
    """Plays action chunks tick by tick; `receive` a chunk when it arrives, `play` every tick."""

    def __init__(self, default_action: Any):
        self._default = default_action
        self.reset()

    def reset(self) -> None:
        """Forget every chunk (a new episode): the default action until the next one."""
        self._chunk: Sequence[Any] = ()
        self._start = -1  # the tick of the observation the held chunk answers; -1: none yet
        self._last = self._default
        self._last_from: int | None = None  # observation tick of the last action played
        self._tick = -1
        self.age: int | None = None  # ticks between the played action's observation and now

    def receive(self, observation_tick: int, actions: Sequence[Any]) -> bool:
        """Take the chunk answering the observation of `observation_tick` (actions for that
        tick onwards); True if it is newer than the held chunk and so replaces it."""
        if observation_tick < 0:
            raise ValueError(f"ticks count from 0, got observation tick {observation_tick}")
        if not len(actions):
            raise ValueError(f"a chunk needs at least one action, got {actions!r}")
        if observation_tick <= self._start:
            return False  # made from an older (or the same) observation: the held plan is newer
        self._chunk, self._start = actions, observation_tick
        return True

    def play(self, tick: int) -> Any:
        """The action for `tick` (ticks must not go backwards); sets `age` (None: default)."""
        if tick < self._tick:
            raise ValueError(f"tick {tick} is before the last tick played ({self._tick})")
        self._tick = tick
        index = tick - self._start
        if self._start >= 0 and 0 <= index < len(self._chunk):
            self._last, self._last_from = self._chunk[index], self._start
        # else no chunk covers this tick: hold the last action played, from its own chunk
        self.age = None if self._last_from is None else tick - self._last_from
        return self._last
