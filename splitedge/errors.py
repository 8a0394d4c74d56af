"""The one user-facing error type: its message says what to do next."""

from __future__ import annotations

import errno
import functools
from collections.abc import Callable
from typing import Any


class SplitedgeError(Exception):
    """A user-facing error; the CLI prints its message on one line and exits non-zero."""

    def __init__(self, message: str, exit_code: int = 2):
        super().__init__(message)
        self.exit_code = exit_code


def os_errors_in_one_line(func: Callable[..., int]) -> Callable[..., int]:
    """Decorate a command: an OSError it meets (an unwritable path, a permission denied, a
    port in use) becomes one line naming the path and what to do, instead of a traceback."""

    @functools.wraps(func)
    def run(*args: Any, **kwargs: Any) -> int:
        try:
            return func(*args, **kwargs)
        except OSError as e:
            where = f" ({e.filename})" if e.filename else ""
            if isinstance(e, PermissionError):
                fix = "run as a user allowed there, or choose another path"
            elif e.errno == errno.EADDRINUSE:
                fix = "that port is in use: stop what holds it or choose another port"
            elif e.errno in (errno.EROFS, errno.ENOSPC):
                fix = "choose a path on a writable disk with free space"
            else:
                fix = "check the path and try again"
            raise SplitedgeError(f"{e.strerror or e}{where}: {fix}") from e

    return run
