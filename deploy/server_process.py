"""Run `splitedge serve` in a child process and wait until its health check says SERVING."""

from __future__ import annotations

import ctypes
import os
import select
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import IO

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from deploy.link.netns import exec_prefix
from splitedge.errors import SplitedgeError


def free_port() -> int:
    """A TCP port on loopback that nothing listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def serve_argv(bundle: Path | str, port: int, *extra: str) -> list[str]:
    """The command line of `splitedge serve` for a bundle on a port, run by this Python."""
    return [sys.executable, "-m", "splitedge", "serve", "--bundle", str(bundle),
            "--port", str(port), *extra]  # fmt: skip


def wait_serving(
    address: str, timeout_s: float, proc: subprocess.Popen[bytes] | None = None
) -> None:
    """Poll grpc.health.v1 until SERVING; raise TimeoutError past timeout_s, or at once
    when `proc` (the server, if given) has exited."""
    end = time.monotonic() + timeout_s
    with grpc.insecure_channel(address) as ch:
        stub = health_pb2_grpc.HealthStub(ch)
        while time.monotonic() < end:
            if proc is not None and proc.poll() is not None:
                raise TimeoutError(f"server for {address} exited with {proc.returncode}")
            try:
                r = stub.Check(
                    health_pb2.HealthCheckRequest(service=""), timeout=1.0, wait_for_ready=True
                )
                if r.status == health_pb2.HealthCheckResponse.SERVING:
                    return
            except grpc.RpcError:
                pass
            time.sleep(0.05)
    raise TimeoutError(f"policy server at {address} not SERVING after {timeout_s:.0f} s")


def stop_process(proc: subprocess.Popen[bytes], err: IO[bytes], timeout_s: float) -> str:
    """SIGTERM, wait up to timeout_s (then SIGKILL); return what it wrote to `err`."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    err.seek(0)
    text = err.read().decode(errors="replace")
    err.close()
    return text


def process_cpu_seconds(pid: int) -> float:
    """CPU time of process pid: its CPU-time clock (ns), else psutil's tick-rounded times."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        clock = ctypes.c_int()
        if libc.clock_getcpuclockid(pid, ctypes.byref(clock)) == 0:
            return time.clock_gettime(clock.value)
    except (OSError, AttributeError):
        pass
    import psutil  # /proc counts in clock ticks (10 ms): too coarse for a short cell

    t = psutil.Process(pid).cpu_times()
    return float(t.user + t.system)


class ServerProcess:
    """A policy server in its own process (so it never shares the edge loop's GIL).

    With netns (and host, an address there) it runs inside that network namespace; the
    caller cannot dial it from here, so readiness is its "serving ..." line on stdout.
    """

    def __init__(
        self,
        bundle: Path,
        port: int | None = None,
        extra_args: list[str] | None = None,
        startup_timeout_s: float = 60.0,
        netns: str | None = None,
        host: str = "127.0.0.1",
    ):
        self.port = port or free_port()
        self.host = host
        self.address = f"{host}:{self.port}"
        self.netns = netns
        self._args = [
            *(exec_prefix(netns) if netns else []),
            *serve_argv(bundle, self.port, "--host", host, *(extra_args or [])),
        ]
        self._timeout = startup_timeout_s
        self.proc: subprocess.Popen[bytes] | None = None

    def __enter__(self) -> ServerProcess:
        # stderr to a file, not a pipe: a chatty server must never block on a full pipe
        self._err = tempfile.TemporaryFile()
        self.proc = subprocess.Popen(
            self._args,
            stdout=subprocess.PIPE if self.netns else subprocess.DEVNULL,
            stderr=self._err,
            env={**os.environ, "PYTHONUNBUFFERED": "1", "SPLITEDGE_OWNER": str(os.getpid())},
        )
        try:
            if self.netns:
                self._wait_ready_line()
            else:
                wait_serving(self.address, self._timeout)
        except TimeoutError as e:
            err = self._stop()
            raise SplitedgeError(f"{e}; server said: {err.strip()[-400:] or '(nothing)'}") from e
        except BaseException:  # Ctrl-C while waiting: leave no server behind
            self._stop()
            raise
        return self

    def _wait_ready_line(self) -> None:
        assert self.proc is not None and self.proc.stdout is not None
        out = self.proc.stdout
        ready, _, _ = select.select([out], [], [], self._timeout)
        if not ready or b"serving" not in out.readline():
            raise TimeoutError(f"policy server in {self.netns} did not start")
        # Keep draining stdout so the server never blocks on a full pipe.
        threading.Thread(target=out.read, daemon=True).start()

    def cpu_seconds(self) -> float:
        """CPU seconds the server process (all its threads) has used so far, to ~1 us."""
        if self.proc is None:
            return 0.0
        return process_cpu_seconds(self.proc.pid)

    def _stop(self) -> str:
        if self.proc is None:
            return ""
        err = stop_process(self.proc, self._err, 10.0)
        self.proc = None
        return err

    def __exit__(self, *exc: object) -> None:
        self._stop()
