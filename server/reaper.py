"""One timer for every call's time limit: unary calls past the server's default deadline,
streams idle past stream_idle_s.

A call arms its task with a due time and disarms it when done; a sweep a few times per
shortest limit cancels the tasks that are overdue and remembers them, so the call's own
CancelledError handler can tell "the reaper ended me" (answer with a status) from "the client
went away". Arming is a dict store, so a limit costs a decision no timer of its own.
"""

from __future__ import annotations

import asyncio
from typing import Any

Task = asyncio.Task[Any]


class Reaper:
    """Cancel tasks past their due time (loop time); run on one event loop."""

    def __init__(self, period_s: float):
        self.period_s = min(1.0, max(0.02, period_s))
        self._due: dict[Task, float] = {}
        self._reaped: set[Task] = set()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._timer: asyncio.TimerHandle | None = None

    def start(self, loop: asyncio.AbstractEventLoop) -> None:
        """Begin sweeping on `loop` (call from any thread)."""
        self._loop = loop
        loop.call_soon_threadsafe(self._sweep)

    def stop(self) -> None:
        """No more sweeps (call on the loop)."""
        if self._timer is not None:
            self._timer.cancel()
        self._loop = None

    def arm(self, task: Task, limit_s: float) -> None:
        """Cancel `task` if it is still armed `limit_s` from now."""
        loop = self._loop or asyncio.get_running_loop()
        self._due[task] = loop.time() + limit_s

    def disarm(self, task: Task) -> None:
        self._due.pop(task, None)

    def reaped(self, task: Task) -> bool:
        """Whether the reaper cancelled `task` (asked once, after its CancelledError)."""
        if task in self._reaped:
            self._reaped.discard(task)
            task.uncancel()
            return True
        return False

    def __len__(self) -> int:
        return len(self._due)

    def _sweep(self) -> None:
        loop = self._loop
        if loop is None:
            return
        now = loop.time()
        if self._reaped:  # tasks that ended before they could ask
            self._reaped = {task for task in self._reaped if not task.done()}
        overdue = [task for task, due in self._due.items() if due <= now]
        for task in overdue:
            del self._due[task]
            if not task.done():
                self._reaped.add(task)
                task.cancel()
        self._timer = loop.call_later(self.period_s, self._sweep)
