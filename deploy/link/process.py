"""LinkProxy in a child process (`python -m deploy.link --control`), so no GIL is shared with it."""

from __future__ import annotations

import dataclasses
import json
import os
import select
import subprocess
import sys
import tempfile
import threading
from typing import IO, Any

from deploy.link.profiles import LinkProfile
from splitedge.errors import SplitedgeError

_START_TIMEOUT_S = 30.0


def read_line(stream: IO[str], timeout_s: float) -> str:
    """One line from a child's pipe, or '' on EOF or timeout."""
    ready, _, _ = select.select([stream], [], [], timeout_s)
    return stream.readline() if ready else ""


class ProxyProcess:
    """The userspace emulator in its own process, optionally inside a network namespace.

    rate=False leaves the rate to a kernel qdisc (tbf); delay=False leaves delay and jitter
    to it too (netem), so the proxy only counts bytes and TCP segments.
    """

    def __init__(
        self,
        profile: LinkProfile,
        upstream: tuple[str, int],
        netns: str | None = None,
        rate: bool = True,
        delay: bool = True,
        seed: int = 0,
        backend: str = "proxy",
    ):
        self.profile = profile
        self.backend = backend
        self.netns = netns  # where clients must run to reach `address`
        self._argv = [
            sys.executable, "-m", "deploy.link", profile.name,
            "--upstream", f"{upstream[0]}:{upstream[1]}",
            "--profile-json", json.dumps(dataclasses.asdict(profile)),
            "--seed", str(seed), "--control",
            *([] if rate else ["--no-rate"]), *([] if delay else ["--no-delay"]),
            *(["--netns", netns] if netns else []),
        ]  # fmt: skip
        self._proc: subprocess.Popen[str] | None = None
        self._address = ""
        self._lock = threading.Lock()

    @property
    def address(self) -> str:
        """HOST:PORT clients dial (inside `netns` when set)."""
        if not self._address:
            raise RuntimeError("ProxyProcess is not started")
        return self._address

    def start(self) -> ProxyProcess:
        """Start the child and wait for its `listening HOST:PORT` line."""
        if self._proc is not None:
            return self
        err = tempfile.TemporaryFile(mode="w+")
        self._proc = subprocess.Popen(
            self._argv,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=err,
            text=True,
            env={**os.environ, "SPLITEDGE_OWNER": str(os.getpid())},
        )
        assert self._proc.stdout is not None
        line = read_line(self._proc.stdout, _START_TIMEOUT_S)
        if not line.startswith("listening "):
            self.close()
            err.seek(0)
            raise SplitedgeError(
                f"link emulator for '{self.profile.name}' did not start: "
                f"{err.read().strip()[-400:] or line or 'no output'}"
            )
        err.close()
        self._address = line.split()[1]
        return self

    def stats(self) -> dict[str, Any]:
        """LinkProxy.stats() plus link_up/down (bytes the shaper meters) and bound_up/down
        (the data-carrying part of them, what an exchange's bound charges)."""
        proc = self._proc
        if proc is None or proc.stdin is None or proc.stdout is None:
            raise RuntimeError("ProxyProcess is not started")
        with self._lock:
            try:
                proc.stdin.write("stats\n")
                proc.stdin.flush()
                line = read_line(proc.stdout, 10.0)
            except (BrokenPipeError, ValueError):
                line = ""
        if not line:
            raise SplitedgeError(f"link emulator for '{self.profile.name}' stopped answering")
        s: dict[str, Any] = json.loads(line)
        kernel = self.backend != "proxy"  # a qdisc meters whole frames, the proxy payload bytes
        s["link_up"] = s["frames_up"] if kernel else s["bytes_up"]
        s["link_down"] = s["frames_down"] if kernel else s["bytes_down"]
        s["bound_up"] = s["data_frames_up"] if kernel else s["bytes_up"]
        s["bound_down"] = s["data_frames_down"] if kernel else s["bytes_down"]
        return s

    def close(self) -> None:
        """Stop the child (closing its stdin asks it to); safe to call twice."""
        proc, self._proc = self._proc, None
        if proc is not None:
            reap(proc, 10.0)

    def __enter__(self) -> ProxyProcess:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()


def reap(proc: subprocess.Popen[str], timeout_s: float) -> None:
    """Stop a child that exits when its stdin closes: close it, wait (then kill), close stdout."""
    try:
        if proc.stdin is not None:
            proc.stdin.close()
    except OSError:
        pass
    try:
        proc.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
    if proc.stdout is not None:
        proc.stdout.close()
