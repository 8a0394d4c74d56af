"""Where the device service hands each action: the user's Python function or JSON lines on a Unix socket.

- ``{kind = "entrypoint", entrypoint = "mypkg.robot:apply"}`` calls ``apply(action, info)``
  in the service process for every decision.
- ``{kind = "socket", path = "/run/splitedge/actions.sock"}`` listens on a Unix stream
  socket; every connected reader gets one JSON object per line:
  ``{"step": 12, "action": 1, "fallback": false, "total_ms": 3.1, "t": 1700000000.1}``.
  A reader that falls behind is dropped, so a stuck consumer never stalls the loop.
- ``{kind = "log"}`` only counts (benchmarks).
"""

from __future__ import annotations

import importlib
import json
import os
import socket
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from edge.sources import ConfigError


class Sink(Protocol):
    """Receives every action."""

    name: str

    def send(self, step: int, action: Any, info: dict[str, Any]) -> None: ...

    def close(self) -> None: ...


def _jsonable(action: Any) -> Any:
    return action.tolist() if isinstance(action, np.ndarray) else action


class LogSink:
    """Counts actions; nothing leaves the process."""

    name = "log"

    def __init__(self) -> None:
        self.sent = 0

    def send(self, step: int, action: Any, info: dict[str, Any]) -> None:
        self.sent += 1

    def close(self) -> None:
        pass


class EntrypointSink:
    """Calls the user's `module:function(action, info)` for each decision."""

    def __init__(self, spec: str):
        self.name = f"entrypoint:{spec}"
        module, _, attr = spec.partition(":")
        if not module or not attr:
            raise ConfigError(f"sink entrypoint {spec!r} must look like 'package.module:function'")
        try:
            fn = getattr(importlib.import_module(module), attr)
        except (ImportError, AttributeError) as e:
            raise ConfigError(
                f"sink entrypoint {spec!r} cannot be loaded ({e}); is the package installed "
                "in the device runtime?"
            ) from e
        if not callable(fn):
            raise ConfigError(f"sink entrypoint {spec!r} is not callable")
        self.fn: Callable[[Any, dict[str, Any]], Any] = fn

    def send(self, step: int, action: Any, info: dict[str, Any]) -> None:
        self.fn(action, {"step": step, **info})

    def close(self) -> None:
        pass


class SocketSink:
    """A listening Unix socket; JSON lines to every connected reader, non-blocking."""

    def __init__(self, path: str | Path, backlog: int = 8):
        self.path = Path(path)
        self.name = f"socket:{self.path}"
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if self.path.is_socket():
            self.path.unlink()  # stale from a previous run
        self.server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            self.server.bind(str(self.path))
        except OSError as e:
            raise ConfigError(f"cannot listen on {self.path}: {e}") from e
        os.chmod(self.path, 0o666)  # the user's code usually runs as another user
        self.server.listen(backlog)
        self.server.setblocking(False)
        self.clients: list[socket.socket] = []
        self.dropped = 0

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.server.accept()
            except (BlockingIOError, InterruptedError):
                return
            conn.setblocking(False)
            self.clients.append(conn)

    def send(self, step: int, action: Any, info: dict[str, Any]) -> None:
        self._accept()
        if not self.clients:
            return
        line = (
            json.dumps({"step": step, "action": _jsonable(action), "t": time.time(), **info}) + "\n"
        ).encode()
        alive = []
        for c in self.clients:
            try:
                if c.send(line) == len(line):
                    alive.append(c)
                    continue
            except OSError:
                pass
            c.close()  # gone, or its buffer is full: a partial line would corrupt the stream
            self.dropped += 1
        self.clients = alive

    def close(self) -> None:
        for c in self.clients:
            c.close()
        self.server.close()
        if self.path.is_socket():
            self.path.unlink()


def open_sink(cfg: dict[str, Any], run_dir: Path) -> Sink:
    """A sink from the service config's [sink] table."""
    kind = cfg.get("kind", "socket")
    if kind == "socket":
        return SocketSink(cfg.get("path") or run_dir / "actions.sock")
    if kind == "entrypoint":
        return EntrypointSink(str(cfg.get("entrypoint", "")))
    if kind == "log":
        return LogSink()
    raise ConfigError(f"sink kind {kind!r} is not one of socket, entrypoint, log")
