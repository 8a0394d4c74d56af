"""Edge clients in their own processes: N closed loops started together against one server.

Each client is `python -m deploy.edge_worker` (no GIL shared with the others, the link
emulator or the measuring process), optionally inside the edge network namespace. The
group starts them, waits until every one has connected and warmed up, releases them at
once, and collects their step records. Steps are streamed as they happen, for progress.
"""

from __future__ import annotations

import json
import os
import queue
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from typing import IO, Any

from edge.telemetry import StepRecord
from splitedge.errors import SplitedgeError

_READY_TIMEOUT_S = 300.0  # 64 clients importing onnxruntime on 2 cores take a while


@dataclass
class ClientResult:
    """What one client process reported."""

    records: list[StepRecord]
    seconds: float
    encoder: str
    extra: dict[str, Any] = field(default_factory=dict)  # e.g. sysmon samples in a soak


class ClientGroup:
    """n worker processes running the same job; use as a context manager (kills on exit)."""

    def __init__(self, n: int, job: dict[str, Any]):
        self.n, self.job = n, job
        self._procs: list[subprocess.Popen[str]] = []
        self._errs: list[IO[str]] = []
        self._events: queue.Queue[tuple[int, dict[str, Any]]] = queue.Queue()
        self.t_go = self.t_done = 0.0

    def start(self) -> ClientGroup:
        """Spawn the workers and wait until each is connected and warmed up."""
        for i in range(self.n):
            err = tempfile.TemporaryFile(mode="w+")
            proc = subprocess.Popen(
                [sys.executable, "-m", "deploy.edge_worker"],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=err,
                text=True,
                env={**os.environ, "SPLITEDGE_OWNER": str(os.getpid())},
            )
            self._procs.append(proc)
            self._errs.append(err)
            assert proc.stdin is not None
            proc.stdin.write(json.dumps({**self.job, "client_id": f"c{i}", "index": i}) + "\n")
            proc.stdin.flush()
            threading.Thread(target=self._read, args=(i, proc), daemon=True).start()
        self._await("ready", _READY_TIMEOUT_S)
        return self

    def _read(self, i: int, proc: subprocess.Popen[str]) -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            try:
                self._events.put((i, json.loads(line)))
            except json.JSONDecodeError:
                continue
        self._events.put((i, {"event": "exit"}))

    def _await(self, kind: str, timeout_s: float, on_step: Any = None) -> dict[int, dict]:
        got: dict[int, dict[str, Any]] = {}
        end = time.monotonic() + timeout_s
        while len(got) < self.n:
            try:
                i, ev = self._events.get(timeout=max(0.0, end - time.monotonic()))
            except queue.Empty:
                raise SplitedgeError(
                    f"{self.n - len(got)} edge client(s) not {kind} after {timeout_s:.0f} s"
                ) from None
            if ev["event"] == kind:
                got[i] = ev
            elif ev["event"] == "exit" and i in got:
                continue  # finished after saying what we waited for
            elif ev["event"] == "step" and on_step is not None:
                on_step(i)
            elif ev["event"] in ("error", "exit"):
                raise SplitedgeError(f"edge client {i} failed: {self._why(i, ev)}")
        return got

    def _why(self, i: int, ev: dict[str, Any]) -> str:
        if ev.get("message"):
            return str(ev["message"])
        err = self._errs[i]
        err.flush()
        err.seek(0)
        return err.read().strip()[-400:] or "exited without a word"

    def go(self) -> None:
        """Release every client at once."""
        self.t_go = time.perf_counter()
        for proc in self._procs:
            assert proc.stdin is not None
            proc.stdin.write("go\n")
            proc.stdin.flush()

    def wait(self, timeout_s: float, on_step: Any = None) -> list[ClientResult]:
        """Collect every client's records (in client order); on_step(i) per step streamed."""
        done = self._await("done", timeout_s, on_step)
        self.t_done = time.perf_counter()
        return [
            ClientResult(
                records=[StepRecord(**r) for r in ev["records"]],
                seconds=ev["seconds"],
                encoder=ev.get("encoder", ""),
                extra=ev.get("extra", {}),
            )
            for _, ev in sorted(done.items())
        ]

    def close(self) -> None:
        """Stop every worker still running; safe to call twice."""
        for proc in self._procs:
            if proc.poll() is None:
                proc.terminate()
        for proc in self._procs:
            try:
                proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
            for stream in (proc.stdin, proc.stdout):
                try:
                    if stream is not None:
                        stream.close()
                except OSError:
                    pass
        for err in self._errs:
            err.close()
        self._procs, self._errs = [], []

    def __enter__(self) -> ClientGroup:
        try:
            return self.start()
        except BaseException:
            self.close()
            raise

    def __exit__(self, *exc: object) -> None:
        self.close()
