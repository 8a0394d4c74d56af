"""Sub-millisecond timers for asyncio: an event loop that wakes within ~0.1 ms of call_at."""

from __future__ import annotations

import asyncio
import ctypes
import select
import selectors
import sys
import time

_PR_SET_TIMERSLACK = 29  # linux/prctl.h


_SLICE_S = 0.01  # longest single kernel wait; see PreciseEpollSelector


class PreciseEpollSelector(selectors.EpollSelector):
    """epoll whose timeouts are honoured to ~0.1 ms instead of rounded up to 1 ms.

    epoll_wait() counts whole milliseconds, so asyncio's default loop fires timers up to
    1 ms late. An epoll fd is itself readable when any watched fd is ready, so we wait on
    it with select(), whose timeout has microsecond resolution, then collect events.
    Linux lets a select() timer fire up to 0.1% of its timeout late (0.3 ms on a 300 ms
    satellite delay), so long waits are cut into slices of at most _SLICE_S.
    """

    def select(self, timeout: float | None = None) -> list[tuple[selectors.SelectorKey, int]]:
        if timeout is not None and timeout > 0:
            deadline = time.monotonic() + timeout
            try:
                while (remaining := deadline - time.monotonic()) > 0:
                    if select.select([self.fileno()], [], [], min(remaining, _SLICE_S))[0]:
                        break
            except ValueError:  # epoll fd >= FD_SETSIZE: fall back to millisecond wake-ups
                return super().select(max(0.0, deadline - time.monotonic()))
            timeout = 0
        return super().select(timeout)


def new_precise_loop() -> asyncio.AbstractEventLoop:
    """A selector event loop with microsecond-resolution timer wake-ups where the OS allows."""
    if hasattr(selectors, "EpollSelector"):
        return asyncio.SelectorEventLoop(PreciseEpollSelector())
    # select() already takes microsecond timeouts (macOS, BSD).
    return asyncio.SelectorEventLoop(selectors.SelectSelector())


def tighten_timer_slack(slack_ns: int = 1000) -> bool:
    """Lower this thread's Linux timer slack (default 50 us) so sleeps end on time; best effort."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        return int(libc.prctl(_PR_SET_TIMERSLACK, slack_ns, 0, 0, 0)) == 0
    except (OSError, AttributeError):
        return False
