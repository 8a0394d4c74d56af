"""Server logs: one line per event (start, sessions, refusals by code, drain, exit), as text
or as one JSON object per line (--log-json), to stderr.

Clients decide how often some events happen, so each event kind logs at most BURST lines
per WINDOW_S; the rest are counted, and the next line of that kind says how many were
suppressed. A flood of refused calls is then a few lines a minute, not a full disk.
"""

from __future__ import annotations

import json
import logging
import sys
import threading
import time
from typing import Any

LOGGER = "splitedge.server"
BURST, WINDOW_S = 10, 10.0
_STANDARD = set(vars(logging.makeLogRecord({}))) | {"message", "asctime"}


class JsonFormatter(logging.Formatter):
    """{"ts", "level", "logger", "msg", and any extra fields} on one line."""

    def format(self, record: logging.LogRecord) -> str:
        doc: dict[str, Any] = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        doc.update({k: v for k, v in vars(record).items() if k not in _STANDARD})
        if record.exc_info:
            doc["exc"] = self.formatException(record.exc_info)
        return json.dumps(doc, default=str)


class TextFormatter(logging.Formatter):
    """'time level msg key=value ...' (the extra fields after the message)."""

    def format(self, record: logging.LogRecord) -> str:
        extra = {k: v for k, v in vars(record).items() if k not in _STANDARD and k != "event"}
        fields = " ".join(f"{k}={v}" for k, v in extra.items())
        line = f"{self.formatTime(record)} {record.levelname.lower()} {record.getMessage()}"
        line = f"{line} {fields}" if fields else line
        return f"{line}\n{self.formatException(record.exc_info)}" if record.exc_info else line


def configure(level: str = "info", json_lines: bool = False) -> None:
    """Send this process's logs to stderr at `level`, as text or JSON lines."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if json_lines else TextFormatter())
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level.upper())
    logging.getLogger("grpc").setLevel(max(logging.WARNING, root.level))


class EventLog:
    """Log events of kinds that clients can make frequent, at most BURST per WINDOW_S each."""

    def __init__(self, logger: logging.Logger):
        self.logger = logger
        self._lock = threading.Lock()
        self._windows: dict[str, tuple[float, int, int]] = {}  # kind -> (start, logged, dropped)

    def event(self, kind: str, level: int, msg: str, **fields: Any) -> None:
        """Log `msg` with `fields` unless this kind is over its budget (then count it)."""
        if not self.logger.isEnabledFor(level):
            return
        now = time.monotonic()
        with self._lock:
            start, logged, dropped = self._windows.get(kind, (now, 0, 0))
            if now - start >= WINDOW_S:
                start, logged = now, 0
            if logged >= BURST:
                self._windows[kind] = (start, logged, dropped + 1)
                return
            self._windows[kind] = (start, logged + 1, 0)
        if dropped:
            fields["suppressed"] = dropped  # lines of this kind not logged since the last one
        self.logger.log(level, msg, extra={"event": kind, **fields})


events = EventLog(logging.getLogger(LOGGER))
