"""Device side, shared by every op: the release links, the history, the service that runs `current`.

Stdlib only: it runs on the device's own python3, sent over ssh with remote.py
(transport.device_script), before any runtime exists there.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path
from typing import Any

# the device config's keys (etc/device.json); the same tuple as edge.service.DEVICE_SETTINGS,
# which this stdlib-only script cannot import (tests/test_flash_commit.py checks they agree)
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
UNIT_NAME = "splitedge.service"
UNIT_PATH = Path("/etc/systemd/system") / UNIT_NAME


class Refused(Exception):
    """The device refuses an operation; the message says why."""


def now_iso(t: float | None = None) -> str:
    """A UTC timestamp as the device's state files write it."""
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(time.time() if t is None else t))


def read_or_none(p: Path) -> str | None:
    return p.read_text().strip() if p.is_file() else None


def read_json(p: Path) -> dict[str, Any] | None:
    """A JSON state file, or None when missing or half-written."""
    try:
        return dict(json.loads(p.read_text()))
    except (OSError, ValueError):
        return None


def write_json(p: Path, data: dict[str, Any]) -> None:
    """Replace a state file whole (write a temporary file, then rename)."""
    p.parent.mkdir(parents=True, exist_ok=True)
    tmp = p.with_name(f".{p.name}.tmp{os.getpid()}")
    tmp.write_text(json.dumps(data, indent=1))
    os.replace(tmp, p)


def link_name(link: Path) -> str | None:
    return os.readlink(link).split("/")[-1] if link.is_symlink() else None


def release_kind(release: Path) -> str:
    """'policy' or 'llm' (release.json; releases flashed before kinds were recorded are policy)."""
    try:
        return str(json.loads((release / "release.json").read_text()).get("kind", "policy"))
    except (OSError, ValueError):
        return "policy"


def replace_symlink(link: Path, target: str) -> None:
    """Atomically point link at target: the same syscalls as `ln -sfn target tmp && mv -T tmp link`."""
    tmp = link.with_name(f".{link.name}.tmp{os.getpid()}")
    if tmp.is_symlink():
        tmp.unlink()
    os.symlink(target, tmp)
    os.replace(tmp, link)


def point(root: Path, current: str | None, previous: str | None) -> None:
    """Set the current and previous links (None removes one); current moves in one rename."""
    for name, release in (("previous", previous), ("current", current)):
        link = root / name
        if release:
            replace_symlink(link, f"releases/{release}")
        elif link.is_symlink():
            link.unlink()


def history(root: Path, event: dict[str, Any]) -> None:
    (root / "state").mkdir(parents=True, exist_ok=True)
    with open(root / "state" / "history.jsonl", "a") as f:
        f.write(json.dumps({"at": now_iso(), **event}) + "\n")


def run_or_refuse(argv: list[str], what: str) -> None:
    r = subprocess.run(argv, capture_output=True, text=True)
    if r.returncode != 0:
        tail = (r.stderr or r.stdout).strip().splitlines()[-6:]
        raise Refused(
            f"could not {what} ({' '.join(argv[:3])} ... exit {r.returncode}): " + " | ".join(tail)
        )


# -- the service ----------------------------------------------------------------------------
def can_manage_systemd() -> tuple[bool, str]:
    if not Path("/run/systemd/system").is_dir():
        return False, "systemd is not running (no /run/systemd/system)"
    if os.geteuid() == 0:
        return True, "root"
    sudo = shutil.which("sudo")
    if sudo and subprocess.run([sudo, "-n", "true"], capture_output=True).returncode == 0:
        return True, "passwordless sudo"
    return False, "systemd runs but this user is not root and has no passwordless sudo"


def supervisor_pid(root: Path) -> int | None:
    """The recorded supervisor pid if that process is still our supervisor (pids get reused)."""
    try:
        pid = int((root / "run" / "supervisor.pid").read_text())
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ")
    except (OSError, ValueError):
        return None
    return pid if b"edge.service" in cmdline and b"supervise" in cmdline else None


def _systemctl(*args: str) -> subprocess.CompletedProcess[str]:
    prefix = [] if os.geteuid() == 0 else ["sudo", "-n"]
    return subprocess.run([*prefix, "systemctl", *args], capture_output=True, text=True)


def restart_service(root: Path) -> str:
    """(Re)start the service on the current release: systemd when manageable, else the supervisor."""
    if release_kind(root / "current") == "llm":
        return f"no service for an llm bundle ({stop_service(root)})"
    if not (root / "current").is_dir():
        return f"no current release ({stop_service(root)})"
    unit = root / "current" / "splitedge.service"
    if can_manage_systemd()[0] and unit.is_file():
        if not UNIT_PATH.is_file() or UNIT_PATH.read_text() != unit.read_text():
            prefix = [] if os.geteuid() == 0 else ["sudo", "-n"]
            run_or_refuse(
                [*prefix, "install", "-m", "0644", str(unit), str(UNIT_PATH)],
                "install the systemd unit",
            )
            _systemctl("daemon-reload")
            _systemctl("enable", UNIT_NAME)
        r = _systemctl("restart", UNIT_NAME)
        return (
            "systemd: restarted"
            if r.returncode == 0
            else f"systemd: restart failed: {r.stderr.strip()}"
        )
    stop_service(root)
    python = root / "current" / "runtime" / "venv" / "bin" / "python"
    (root / "run").mkdir(parents=True, exist_ok=True)
    log = open(root / "run" / "service.log", "ab")  # noqa: SIM115 - handed to the child
    proc = subprocess.Popen(
        [str(python), "-m", "edge.service", "supervise", "--root", str(root)],
        stdin=subprocess.DEVNULL,
        stdout=log,
        stderr=log,
        close_fds=True,
        start_new_session=True,
        cwd=str(root),
    )
    (root / "run" / "supervisor.pid").write_text(str(proc.pid))
    return f"supervisor: started pid {proc.pid}"


def stop_service(root: Path) -> str:
    """Stop whichever manager runs the service."""
    if can_manage_systemd()[0] and UNIT_PATH.is_file():
        _systemctl("stop", UNIT_NAME)
        return "systemd: stopped"
    pid = supervisor_pid(root)
    if pid is None:
        return "supervisor: not running"
    os.kill(pid, signal.SIGTERM)
    for _ in range(100):
        if supervisor_pid(root) is None or _zombie(pid):
            return "supervisor: stopped"
        time.sleep(0.05)
    os.kill(pid, signal.SIGKILL)
    return "supervisor: killed after 5 s"


def _zombie(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0] == "Z"
    except OSError:
        return True


def service_state(root: Path) -> dict[str, Any]:
    """Manager, whether it runs, and the service's own last word (state/service.json)."""
    systemd = can_manage_systemd()[0] and UNIT_PATH.is_file()
    own_path = Path("/run/splitedge/service.json") if systemd else root / "state" / "service.json"
    own = read_json(own_path) or {}
    if systemd:
        active = _systemctl("is-active", UNIT_NAME).stdout.strip()
        return {"manager": "systemd", "active": active, **own}
    pid = supervisor_pid(root)
    return {"manager": "supervisor", "active": "active" if pid else "inactive", "pid": pid, **own}
