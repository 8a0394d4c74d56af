"""The on-device service: frames from a source -> encoder -> policy server -> actions to a sink.

    python -m edge.service run --config /opt/splitedge/current/service.json
    python -m edge.service supervise --root /opt/splitedge     # when systemd is absent
    python -m edge.service verify --release DIR [--public-key K]
    python -m edge.service health --release DIR [--server H:P | --local] [--out FILE]

`run` tells systemd READY=1 once its source and sink are open, then WATCHDOG=1
as long as the loop turns (sd_notify protocol, no library needed). A config
that cannot work (missing camera, bad entry point) exits with EX_CONFIG (78),
which the unit's RestartPreventExitStatus and the fallback supervisor both
treat as final: one clear error, not a crash loop.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

EX_CONFIG = 78
# settings that belong to the device, not to a release: etc/device.json (written by flash and
# `flash --reconfigure` under the device's commit model) overrides the release's service.json
DEVICE_SETTINGS = (
    "server",
    "backend",
    "backend_reason",
    "source",
    "sink",
    "rate_hz",
    "deadline_ms",
    "token_file",
)


def sd_notify(message: str) -> bool:
    """Send one sd_notify datagram (READY=1, WATCHDOG=1, STATUS=...) if systemd asked for them."""
    address = os.environ.get("NOTIFY_SOCKET")
    if not address:
        return False
    if address.startswith("@"):
        address = "\0" + address[1:]  # abstract namespace
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as s:
        try:
            s.connect(address)
            s.sendall(message.encode())
        except OSError:
            return False
    return True


@dataclass
class ServiceConfig:
    """service.json (or .toml): what the service reads, whom it asks, where actions go."""

    bundle: Path
    server: str
    backend: str = "auto"
    backend_reason: str = ""  # why the flasher chose this backend for the device
    deadline_ms: float = 500.0
    rate_hz: float = 20.0  # 0 = as fast as the loop goes
    max_steps: int = 0  # 0 = forever
    source: dict[str, Any] = field(default_factory=lambda: {"kind": "env"})
    sink: dict[str, Any] = field(default_factory=lambda: {"kind": "socket"})
    state_dir: Path = Path("state")
    run_dir: Path = Path("run")
    # the user's env packages (flash --env-package): wheel path -> sha256, installed by the
    # flasher into packages/ beside this file, which goes on sys.path
    env_wheels: dict[str, str] = field(default_factory=dict)
    device_config: str = ""  # the device's settings file (DEVICE_SETTINGS), read over these
    token_file: str = ""  # the device's bearer token for the policy server (device config)
    packages: Path | None = field(default=None, init=False)

    @classmethod
    def load(cls, path: str | Path) -> ServiceConfig:
        """Read a config file; relative paths are relative to its folder; systemd's dirs win when set."""
        from splitedge.errors import SplitedgeError

        path = Path(path)
        try:
            if path.suffix == ".toml":
                import tomllib

                raw = tomllib.loads(path.read_text())
            else:
                raw = json.loads(path.read_text())
        except (OSError, ValueError) as e:
            raise SplitedgeError(f"cannot read service config {path}: {e}") from e
        if raw.get("device_config"):
            raw.update(_device_settings(Path(raw["device_config"])))
        known = {name for name, f in cls.__dataclass_fields__.items() if f.init}
        unknown = sorted(set(raw) - known)
        if unknown or "bundle" not in raw or "server" not in raw:
            raise SplitedgeError(
                f"{path}: needs 'bundle' and 'server'; unknown keys {unknown} (known: {sorted(known)})"
            )
        cfg = cls(**raw)
        base = path.parent
        cfg.bundle = base / cfg.bundle
        cfg.packages = base / "packages" if cfg.env_wheels else None
        # under systemd (DynamicUser, read-only system) only its RuntimeDirectory is writable
        cfg.state_dir = Path(os.environ.get("RUNTIME_DIRECTORY") or base / cfg.state_dir)
        cfg.run_dir = Path(os.environ.get("RUNTIME_DIRECTORY") or base / cfg.run_dir)
        return cfg

    def security(self) -> Any:
        """The channel settings: SPLITEDGE_* variables, with the device config's token file."""
        import dataclasses

        from edge.channel import ChannelSecurity

        found = ChannelSecurity.from_env()
        return dataclasses.replace(found, token_file=self.token_file) if self.token_file else found

    def use_packages(self) -> None:
        """Put the release's env packages on sys.path, before any source is opened."""
        from splitedge.errors import SplitedgeError

        if self.packages is None:
            return
        if not self.packages.is_dir():
            raise SplitedgeError(
                f"{self.packages} is missing: the release's env packages were never installed; "
                "flash it again"
            )
        if str(self.packages) not in sys.path:
            sys.path.insert(0, str(self.packages))


def _device_settings(path: Path) -> dict[str, Any]:
    """The device config's settings (none when the file is missing)."""
    from splitedge.errors import SplitedgeError

    try:
        raw = json.loads(path.read_text())
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as e:
        raise SplitedgeError(
            f"cannot read the device config {path}: {e}; fix it with "
            "`splitedge flash --reconfigure`"
        ) from e
    return {k: v for k, v in raw.items() if k in DEVICE_SETTINGS}


class _Stop:
    def __init__(self) -> None:
        self.requested = False
        signal.signal(signal.SIGTERM, self._set)
        signal.signal(signal.SIGINT, self._set)

    def _set(self, *_: Any) -> None:
        self.requested = True


def _write_state(cfg: ServiceConfig, state: dict[str, Any]) -> None:
    cfg.state_dir.mkdir(parents=True, exist_ok=True)
    tmp = cfg.state_dir / ".service.json.tmp"
    tmp.write_text(json.dumps({"at": time.time(), **state}))
    os.replace(tmp, cfg.state_dir / "service.json")


def run_service(cfg: ServiceConfig) -> int:
    """The service loop; returns the process exit status."""
    from edge.client import ClientConfig, PolicyClient
    from edge.sinks import open_sink
    from edge.sources import open_source
    from splitedge.bundle import load_bundle
    from splitedge.errors import SplitedgeError

    stop = _Stop()
    bundle = load_bundle(cfg.bundle)
    try:
        cfg.use_packages()
        source = open_source(cfg.source, bundle.policy)
        sink = open_sink(cfg.sink, cfg.run_dir)
    except SplitedgeError as e:  # ConfigError, or the packages are missing
        print(f"splitedge service: {e}", file=sys.stderr)
        _write_state(cfg, {"state": "failed", "error": str(e), "exit": EX_CONFIG})
        sd_notify(f"STATUS=failed: {e}")
        return EX_CONFIG
    client = PolicyClient(
        bundle,
        ClientConfig(
            server=cfg.server,
            backend=cfg.backend,
            deadline_s=cfg.deadline_ms / 1e3,
            rpc="unary",
            security=cfg.security(),
        ),
    )
    watchdog_s = int(os.environ.get("WATCHDOG_USEC", "0")) / 2e6
    sd_notify(f"READY=1\nSTATUS={source.name} -> {cfg.server} -> {sink.name}")
    print(
        f"splitedge service: {source.name} -> {cfg.server} -> {sink.name}; "
        f"encoder {client.encoder_reason}",
        file=sys.stderr,
        flush=True,
    )
    _connect_with_backoff(client, cfg, stop, watchdog_s)
    period = 1.0 / cfg.rate_hz if cfg.rate_hz > 0 else 0.0
    step, last_ping, last_state, exit_code = 0, 0.0, 0.0, 0
    try:
        while not stop.requested and (cfg.max_steps == 0 or step < cfg.max_steps):
            t0 = time.monotonic()
            frame = source.read()
            if frame is None:
                break
            action = client.act(frame)
            d = client.last
            info = {"fallback": bool(d.fallback), "total_ms": round(d.total_ms, 3)} if d else {}
            sink.send(step, action, info)
            source.feedback(action)
            step += 1
            now = time.monotonic()
            if watchdog_s and now - last_ping >= watchdog_s:
                sd_notify("WATCHDOG=1")
                last_ping = now
            if now - last_state >= 1.0:
                _write_state(
                    cfg,
                    {
                        "state": "running",
                        "pid": os.getpid(),
                        "steps": step,
                        "fallbacks": client.fallbacks,
                        "source": source.name,
                        "sink": sink.name,
                        "backend": client.encoder_reason,
                    },
                )
                last_state = now
            if period:
                time.sleep(max(0.0, period - (time.monotonic() - t0)))
    finally:
        _write_state(
            cfg,
            {"state": "stopped", "steps": step, "fallbacks": client.fallbacks, "exit": exit_code},
        )
        client.close()
        sink.close()
        source.close()
    return exit_code


def _connect_with_backoff(client: Any, cfg: ServiceConfig, stop: _Stop, watchdog_s: float) -> None:
    """Say Hello until the server answers, pinging the watchdog: a server outage is not a crash."""
    from splitedge.errors import SplitedgeError

    delay = 0.5
    while not stop.requested:
        try:
            client.connect()
            return
        except (ConnectionError, SplitedgeError) as e:
            _write_state(cfg, {"state": "waiting for server", "pid": os.getpid(), "error": str(e)})
            sd_notify(f"STATUS=waiting for {cfg.server}: {e}")
        end = time.monotonic() + delay
        while time.monotonic() < end and not stop.requested:
            if watchdog_s:
                sd_notify("WATCHDOG=1")
            time.sleep(min(0.5, delay))
        delay = min(delay * 2, 30.0)


def _stamp_lines(child: subprocess.Popen[bytes]) -> None:
    """Copy the child's output to ours (the service log), each line with a UTC timestamp."""
    import threading

    def copy() -> None:
        assert child.stdout is not None
        for line in iter(child.stdout.readline, b""):
            stamp = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
            sys.stdout.write(f"{stamp} {line.decode(errors='replace').rstrip()}\n")
            sys.stdout.flush()

    threading.Thread(target=copy, daemon=True).start()


def supervise(root: Path, backoff_s: tuple[float, float] = (1.0, 30.0)) -> int:
    """systemd's job when there is no systemd: run the current release, restart it on failure."""
    stop = _Stop()
    delay, restarts = backoff_s[0], 0
    state = root / "state" / "supervisor.json"
    while not stop.requested:
        config = root / "current" / "service.json"
        python = root / "current" / "runtime" / "venv" / "bin" / "python"
        started = time.monotonic()
        child = subprocess.Popen(
            [str(python), "-m", "edge.service", "run", "--config", str(config)],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
        )
        _stamp_lines(child)
        state.write_text(
            json.dumps(
                {"child": child.pid, "restarts": restarts, "release": os.readlink(root / "current")}
            )
        )
        while child.poll() is None:
            if stop.requested:
                child.terminate()
                try:
                    child.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    child.kill()
                return 0
            time.sleep(0.2)
        if child.returncode in (0, EX_CONFIG):
            return int(child.returncode)  # finished, or a config error that a restart cannot fix
        restarts += 1
        stamp = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        print(f"{stamp} supervisor: the service exited {child.returncode}; restart {restarts}")
        sys.stdout.flush()
        delay = backoff_s[0] if time.monotonic() - started > 60 else min(backoff_s[1], delay * 2)
        end = time.monotonic() + delay
        while time.monotonic() < end and not stop.requested:
            time.sleep(0.1)
    return 0


def main(argv: list[str] | None = None) -> int:
    from splitedge.errors import SplitedgeError

    p = argparse.ArgumentParser(prog="python -m edge.service", description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("run")
    r.add_argument("--config", type=Path, required=True)
    s = sub.add_parser("supervise")
    s.add_argument("--root", type=Path, required=True)
    v = sub.add_parser("verify")
    v.add_argument("--release", type=Path, required=True)
    v.add_argument("--public-key", type=Path)
    h = sub.add_parser("health")
    h.add_argument("--release", type=Path, required=True)
    h.add_argument("--server")
    h.add_argument("--local", action="store_true", help="no round trip to the server")
    h.add_argument("--out", type=Path, help="also write the result here (state/health.json)")
    a = p.parse_args(argv)
    try:
        if a.cmd == "run":
            return run_service(ServiceConfig.load(a.config))
        if a.cmd == "supervise":
            return supervise(a.root)
        from edge.health import health, verify_release

        result = (
            verify_release(a.release, a.public_key)
            if a.cmd == "verify"
            else health(a.release, a.server, local=a.local)
        )
    except SplitedgeError as e:
        result = {"ok": False, "error": str(e)}
        if a.cmd == "run":
            print(f"splitedge service: {e}", file=sys.stderr)
            return EX_CONFIG
    if a.cmd == "health" and a.out:
        a.out.parent.mkdir(parents=True, exist_ok=True)
        a.out.write_text(json.dumps(result))
    print(json.dumps(result))
    return 0 if result["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
