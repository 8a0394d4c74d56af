"""ssh and rsync to a device, through the user's own binaries (their ~/.ssh/config and agent apply).

Every command is an argument list, never a shell string on this side. The one
string that must exist is the remote command line ssh hands to the device's
shell; it is built with shlex.join from a list, so nothing in it is interpreted.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from splitedge.errors import SplitedgeError

REMOTE_SCRIPT = Path(__file__).with_name("remote.py")
# stdlib-only modules remote.py imports, in dependency order; sent with it as one script
DEVICE_MODULES = ("device_base", "device_commit", "device_manage")
_TARGET = re.compile(
    r"^(?:(?P<user>[^@\s/]+)@)?(?:\[(?P<ip6>[0-9a-fA-F:.]+)\]|(?P<host>[^@:\s/\[\]]+))(?::(?P<port>\d+))?$"
)


def device_script() -> str:
    """remote.py and the device modules it imports, as one script for the device's `python3 -`.

    Each module is compiled under its own name and registered in sys.modules, so remote.py's
    imports resolve there exactly as they do here; remote.py itself runs as __main__.
    """
    sources = {
        f"deploy.flash.{m}": REMOTE_SCRIPT.with_name(f"{m}.py").read_text() for m in DEVICE_MODULES
    }
    return "\n".join(
        [
            "import sys, types",
            "for _pkg in ('deploy', 'deploy.flash'):",
            "    sys.modules[_pkg] = types.ModuleType(_pkg)",
            "    sys.modules[_pkg].__path__ = []",
            f"for _name, _src in {sources!r}.items():",
            "    _mod = sys.modules[_name] = types.ModuleType(_name)",
            "    exec(compile(_src, _name.replace('.', '/') + '.py', 'exec'), _mod.__dict__)",
            "    setattr(sys.modules['deploy.flash'], _name.rsplit('.', 1)[1], _mod)",
            f"_src = {REMOTE_SCRIPT.read_text()!r}",
            "exec(compile(_src, 'deploy/flash/remote.py', 'exec'), {'__name__': '__main__'})",
            "",
        ]
    )


class DeviceRefused(SplitedgeError):
    """The device refused an operation (its message says why); nothing was switched."""


@dataclass(frozen=True)
class Target:
    """USER@HOST[:PORT]; HOST may be an ssh config alias, an IPv4 address or [IPv6]."""

    host: str
    user: str | None = None
    port: int | None = None

    @classmethod
    def parse(cls, text: str) -> Target:
        m = _TARGET.match(text.strip())
        if not m:
            raise SplitedgeError(
                f"--host {text!r} is not USER@HOST[:PORT] (e.g. pi@raspberrypi.local or pi@10.0.0.7:2222)"
            )
        port = int(m["port"]) if m["port"] else None
        if port is not None and not 0 < port < 65536:
            raise SplitedgeError(f"--host {text!r}: port {port} is outside 1..65535")
        return cls(host=m["ip6"] or m["host"], user=m["user"], port=port)

    @property
    def destination(self) -> str:
        """What ssh takes as its destination argument."""
        return f"{self.user}@{self.host}" if self.user else self.host

    @property
    def rsync_host(self) -> str:
        """The host part of an rsync remote path (IPv6 in brackets)."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{self.user}@{host}" if self.user else host

    def __str__(self) -> str:
        return self.destination + (f":{self.port}" if self.port else "")


@dataclass
class Transport:
    """Runs commands and the device script on one device, and copies folders to it."""

    target: Target
    ssh_config: Path | None = None
    ssh_options: list[str] = field(default_factory=list)
    device_python: str = "python3"
    connect_timeout_s: int = 10
    ssh: str = "ssh"
    rsync: str = "rsync"

    def ssh_base(self) -> list[str]:
        """ssh and its options, without the destination (rsync's -e takes this)."""
        argv = [self.ssh, "-o", "BatchMode=yes", "-o", f"ConnectTimeout={self.connect_timeout_s}"]
        # a cut link shows as a dead session within ~15 s instead of a hang
        argv += ["-o", "ServerAliveInterval=5", "-o", "ServerAliveCountMax=3"]
        if self.ssh_config is not None:
            argv += ["-F", str(self.ssh_config)]
        if self.target.port:
            argv += ["-p", str(self.target.port)]
        for opt in self.ssh_options:
            argv += ["-o", opt]
        return argv

    def ssh_argv(self, remote_argv: list[str]) -> list[str]:
        """The local argv that runs remote_argv on the device."""
        return [*self.ssh_base(), self.target.destination, "--", shlex.join(remote_argv)]

    def rsync_argv(self, src: Path, remote_dir: str, bwlimit_kbps: int | None = None) -> list[str]:
        """Copy the contents of src into remote_dir; partial files survive an interruption and resume."""
        argv = [
            self.rsync,
            "-a",
            "--partial",
            "--partial-dir=.rsync-partial",
            "--timeout=60",
            "-e",
            shlex.join(self.ssh_base()),
        ]
        if bwlimit_kbps:
            argv.append(f"--bwlimit={bwlimit_kbps}")
        return [*argv, f"{src}/", f"{self.target.rsync_host}:{remote_dir}/"]

    def run(
        self,
        remote_argv: list[str],
        stdin: str | None = None,
        timeout_s: float | None = None,
        check: bool = True,
    ) -> subprocess.CompletedProcess[str]:
        """Run a command on the device; an ssh failure (exit 255) becomes one clear error."""
        try:
            r = subprocess.run(
                self.ssh_argv(remote_argv),
                input=stdin,
                capture_output=True,
                text=True,
                timeout=timeout_s,
            )
        except FileNotFoundError as e:
            raise SplitedgeError(f"`{self.ssh}` not found; install the OpenSSH client") from e
        except subprocess.TimeoutExpired as e:
            raise SplitedgeError(
                f"{self.target}: `{remote_argv[0]}` did not finish within {timeout_s:.0f} s"
            ) from e
        if r.returncode == 255:
            raise SplitedgeError(
                f"cannot reach {self.target} over ssh: {_last_line(r.stderr)}. "
                f"Check `ssh {self.target.destination}` works without a password (ssh-copy-id)."
            )
        if check and r.returncode != 0 and not r.stdout.strip():
            raise SplitedgeError(
                f"{self.target}: `{shlex.join(remote_argv)[:80]}` exited {r.returncode}: "
                f"{_last_line(r.stderr)}"
            )
        return r

    def op(
        self, op: str, root: str | None, timeout_s: float | None = 600, **options: Any
    ) -> dict[str, Any]:
        """Run one device-script operation (see remote.py) and return its JSON result."""
        argv = [self.device_python, "-", op]
        if root:
            argv += ["--root", root]
        for key, value in options.items():
            flag = "--" + key.replace("_", "-")
            if value is True:
                argv.append(flag)
            elif isinstance(value, list):
                argv += [
                    f"{flag}={v}" for v in value
                ]  # '=' keeps values like '--index-url=...' values
            elif value not in (None, False, ""):
                argv.append(f"{flag}={value}")
        r = self.run(argv, stdin=device_script(), timeout_s=timeout_s, check=False)
        return parse_result(r, f"{self.target}: {op}")

    def copy(
        self,
        src: Path,
        remote_dir: str,
        bwlimit_kbps: int | None = None,
        progress: Callable[[str], None] | None = None,
    ) -> None:
        """rsync src/ to remote_dir/ (resumable); progress gets rsync's overall progress lines."""
        argv = self.rsync_argv(src, remote_dir, bwlimit_kbps)
        if progress is not None:
            argv[1:1] = ["--info=progress2", "--no-inc-recursive"]
        try:
            proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        except FileNotFoundError as e:
            raise SplitedgeError(f"`{self.rsync}` not found here; install rsync") from e
        errors: list[bytes] = []
        reader = threading.Thread(target=lambda: errors.append(proc.stderr.read()))  # type: ignore[union-attr]
        reader.start()
        assert proc.stdout is not None
        pending = b""
        out = proc.stdout.fileno()
        for chunk in iter(lambda: os.read(out, 4096), b""):
            *lines, pending = (pending + chunk).replace(b"\r", b"\n").split(b"\n")
            for line in lines:
                text = line.decode(errors="replace").strip()
                if progress is not None and "%" in text:
                    progress(text)
        proc.wait()
        reader.join()
        if proc.returncode != 0:
            raise SplitedgeError(
                f"copy to {self.target}:{remote_dir} failed (rsync exit {proc.returncode}): "
                f"{_last_line(b''.join(errors).decode(errors='replace'))}. Run flash again to resume."
            )


def parse_result(r: subprocess.CompletedProcess[str], what: str) -> dict[str, Any]:
    """The JSON object on a device command's last stdout line; a refusal raises DeviceRefused."""
    lines = [ln for ln in r.stdout.splitlines() if ln.startswith("{")]
    if not lines:
        raise SplitedgeError(
            f"{what}: no result (exit {r.returncode}): {_last_line(r.stderr) or r.stdout[-200:]}"
        )
    try:
        result = json.loads(lines[-1])
    except json.JSONDecodeError as e:
        raise SplitedgeError(f"{what}: unreadable result {lines[-1][:200]!r}") from e
    if not result.get("ok", False):
        raise DeviceRefused(f"{what}: {result.get('error', 'refused')}")
    return dict(result)


def _last_line(text: str) -> str:
    lines = [ln.strip() for ln in (text or "").splitlines() if ln.strip()]
    return lines[-1] if lines else "(no message)"
