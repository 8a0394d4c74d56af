"""The device side of flashing: a stdlib-only script the flasher pipes to the device's python3.

Run as ``ssh HOST -- python3 - OP --root R ...`` with this file on stdin, so the
device needs nothing but Python 3.9+ before its first flash. Every op prints one
JSON object on stdout; a refusal prints ``{"ok": false, "error": "..."}`` and exits 1.

Device layout under the root (default $SPLITEDGE_ROOT or /opt/splitedge)::

    incoming/<release>/     rsync target; resumable, never run from
    releases/<release>/     bundle/, probe.npz, service.json, release.json, splitedge.service, runtime -> ../../runtimes/<key>
    runtimes/<key>/venv/    the edge runtime, shared by releases that need the same one
    wheelhouse/             wheels carried by the flasher (the splitedge wheel; all deps with --offline)
    current, previous       symlinks into releases/, switched atomically (symlink + rename)
    state/                  health.json, history.jsonl, service.json
    run/                    supervisor.pid, service.log, actions.sock
    etc/signing.pub         when present, every bundle must carry a valid signature by this key
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

DEFAULT_ROOT = "/opt/splitedge"
UNIT_NAME = "splitedge.service"
UNIT_PATH = Path("/etc/systemd/system") / UNIT_NAME
NOT_HASHED = {"manifest.json", "manifest.sig"}


class Refused(Exception):
    """The device refuses an operation; the message says why."""


# -- facts (pre-flight) ---------------------------------------------------------------------
def _meminfo() -> dict[str, int]:
    out: dict[str, int] = {}
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            key, value = line.split(":", 1)
            out[key] = int(value.split()[0]) * 1024
    except (OSError, ValueError):
        pass
    return out


def _cgroup_memory_limit() -> int | None:
    """The memory limit of this process's cgroup (v2 memory.max or v1 limit_in_bytes), if any."""
    try:
        lines = Path("/proc/self/cgroup").read_text().splitlines()
    except OSError:
        return None
    for line in lines:
        _, controllers, path = line.split(":", 2)
        if controllers == "":
            candidate = Path("/sys/fs/cgroup") / path.lstrip("/") / "memory.max"
        elif "memory" in controllers.split(","):
            candidate = Path("/sys/fs/cgroup/memory") / path.lstrip("/") / "memory.limit_in_bytes"
        else:
            continue
        try:
            raw = candidate.read_text().strip()
        except OSError:
            continue
        if raw != "max" and int(raw) < (1 << 60):
            return int(raw)
    return None


def _gl_version() -> str | None:
    for tool, args in (("eglinfo", ["-B"]), ("glxinfo", ["-B"]), ("es2_info", [])):
        exe = shutil.which(tool)
        if not exe:
            continue
        try:
            out = subprocess.run([exe, *args], capture_output=True, text=True, timeout=10).stdout
        except (OSError, subprocess.TimeoutExpired):
            continue
        for line in out.splitlines():
            if (
                "OpenGL ES profile version" in line
                or "GL_VERSION" in line
                or "OpenGL version string" in line
            ):
                return line.split(":", 1)[1].strip()
    return None


def _existing_parent(p: Path) -> Path:
    while not p.exists() and p != p.parent:
        p = p.parent
    return p


def _can_manage_systemd() -> tuple[bool, str]:
    if not Path("/run/systemd/system").is_dir():
        return False, "systemd is not running (no /run/systemd/system)"
    if os.geteuid() == 0:
        return True, "root"
    sudo = shutil.which("sudo")
    if sudo and subprocess.run([sudo, "-n", "true"], capture_output=True).returncode == 0:
        return True, "passwordless sudo"
    return False, "systemd runs but this user is not root and has no passwordless sudo"


def facts(root: Path) -> dict[str, Any]:
    """What pre-flight compares with the device profile."""
    mem = _meminfo()
    limit = _cgroup_memory_limit()
    parent = _existing_parent(root)
    usage = shutil.disk_usage(parent)
    systemd_ok, systemd_why = _can_manage_systemd()
    venv_ok = (
        subprocess.run(
            [sys.executable, "-c", "import venv, ensurepip"], capture_output=True
        ).returncode
        == 0
    )
    return {
        "ok": True,
        "root": str(root),
        "user": _user(),
        "machine": platform.machine(),
        "arch": os.environ.get("SPLITEDGE_EMULATED_ARCH") or platform.machine(),
        "emulated_profile": os.environ.get("SPLITEDGE_EMULATED_PROFILE"),
        "python": platform.python_version(),
        "python_exe": sys.executable,
        "venv": venv_ok,
        "glibc": "-".join(platform.libc_ver()),
        "gl": _gl_version(),
        "ram_total_mb": mem.get("MemTotal", 0) // 2**20,
        "ram_limit_mb": (limit // 2**20) if limit else None,
        "ram_available_mb": mem.get("MemAvailable", 0) // 2**20,
        "disk_free_mb": usage.free // 2**20,
        "disk_path": str(parent),
        "root_writable": os.access(parent, os.W_OK) if parent != root else os.access(root, os.W_OK),
        "rsync": shutil.which("rsync") is not None,
        "systemd": systemd_ok,
        "systemd_reason": systemd_why,
        "trusted_key": _read_or_none(root / "etc" / "signing.pub"),
        "current": _link_name(root / "current"),
        "previous": _link_name(root / "previous"),
        "current_server": _current_server(root),
    }


def _current_server(root: Path) -> str | None:
    try:
        return str(json.loads((root / "current" / "service.json").read_text())["server"])
    except (OSError, ValueError, KeyError):
        return None


def _user() -> str:
    try:
        import pwd

        return pwd.getpwuid(os.geteuid()).pw_name
    except (ImportError, KeyError):
        return str(os.geteuid())


def _read_or_none(p: Path) -> str | None:
    return p.read_text().strip() if p.is_file() else None


def _link_name(link: Path) -> str | None:
    return os.readlink(link).split("/")[-1] if link.is_symlink() else None


# -- staging --------------------------------------------------------------------------------
def prepare(root: Path, release: str) -> dict[str, Any]:
    """Create the layout and the incoming folder for one release."""
    for sub in ("incoming", "releases", "runtimes", "wheelhouse", "state", "run", "etc"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    (root / "incoming" / release).mkdir(exist_ok=True)
    return {"ok": True, "incoming": str(root / "incoming" / release)}


def _sha256(p: Path) -> str:
    h = hashlib.sha256()
    with open(p, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def check_bundle_files(bundle: Path) -> list[str]:
    """Problems comparing a bundle directory with its manifest (same rules as splitedge.bundle)."""
    try:
        listed = json.loads((bundle / "manifest.json").read_text())["files"]
    except (OSError, ValueError, KeyError) as e:
        return [f"manifest.json unreadable: {e}"]
    problems = []
    for rel, digest in sorted(listed.items()):
        p = bundle / rel
        if not p.is_file():
            problems.append(f"{rel}: missing")
        elif _sha256(p) != digest:
            problems.append(f"{rel}: sha256 does not match the manifest")
    on_disk = {p.relative_to(bundle).as_posix() for p in bundle.rglob("*") if p.is_file()}
    problems += [
        f"{rel}: not listed in the manifest" for rel in sorted(on_disk - set(listed) - NOT_HASHED)
    ]
    return problems


def _env_wheels(release: Path) -> dict[str, str]:
    """The user's env wheels a release carries (service.json env_wheels: path -> sha256)."""
    try:
        return dict(json.loads((release / "service.json").read_text()).get("env_wheels") or {})
    except (OSError, ValueError):
        return {}


def check_env_wheels(release: Path) -> list[str]:
    """Problems comparing the carried env wheels with the digests service.json lists."""
    problems = []
    for rel, digest in sorted(_env_wheels(release).items()):
        p = release / rel
        if not p.is_file():
            problems.append(f"{rel}: missing")
        elif _sha256(p) != digest:
            problems.append(f"{rel}: sha256 does not match service.json")
    return problems


def stage(root: Path, release: str) -> dict[str, Any]:
    """Check the transferred release and move it into releases/ (one rename); never touches current."""
    incoming, target = root / "incoming" / release, root / "releases" / release
    needs = ["release.json", "bundle/manifest.json"]
    if (incoming / "release.json").is_file() and _release_kind(incoming) != "llm":
        needs += ["probe.npz", "service.json", "splitedge.service"]  # llm: no service
    for need in needs:
        if not (incoming / need).is_file():
            raise Refused(
                f"transfer incomplete: {need} missing in {incoming}; flash again to resume"
            )
    problems = check_bundle_files(incoming / "bundle") + check_env_wheels(incoming)
    if problems:
        raise Refused("bundle on the device failed its hash check: " + "; ".join(problems))
    if target.exists():
        if _same_files(incoming, target):
            shutil.rmtree(incoming)
            return {"ok": True, "release": str(target), "already_staged": True}
        if release in (_link_name(root / "current"), _link_name(root / "previous")):
            raise Refused(
                f"release {release} is in use on the device with different contents (files, signature "
                "or service config); bump the bundle version"
            )
        shutil.rmtree(target)  # an unused leftover (e.g. a refused earlier try): replace it whole
    os.rename(incoming, target)
    return {"ok": True, "release": str(target), "already_staged": False}


def _same_files(a: Path, b: Path) -> bool:
    """Whether two release folders carry the same bundle, signature, probe and service config."""
    # probe.npz follows from the bundle (and its zip timestamps differ run to run)
    for rel in ("bundle/manifest.json", "bundle/manifest.sig", "service.json", "splitedge.service"):
        pa, pb = a / rel, b / rel
        if pa.is_file() != pb.is_file() or (pa.is_file() and _sha256(pa) != _sha256(pb)):
            return False
    return True


def _release_kind(release: Path) -> str:
    """'policy' or 'llm' (release.json; releases flashed before kinds were recorded are policy)."""
    try:
        return str(json.loads((release / "release.json").read_text()).get("kind", "policy"))
    except (OSError, ValueError):
        return "policy"


def discard(root: Path, release: str) -> dict[str, Any]:
    """Remove a refused release, unless it is current or previous."""
    if release in (_link_name(root / "current"), _link_name(root / "previous")):
        return {"ok": True, "removed": False, "reason": "release is in use"}
    shutil.rmtree(root / "releases" / release, ignore_errors=True)
    return {"ok": True, "removed": True}


def trust_key(root: Path, key_line: str) -> dict[str, Any]:
    """Configure the public key every later bundle must be signed with (first flash only)."""
    path = root / "etc" / "signing.pub"
    current = _read_or_none(path)
    if current is not None and current.split()[:2] != key_line.split()[:2]:
        raise Refused(
            f"the device already trusts a different signing key ({path}); "
            "remove it on the device to change keys"
        )
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(key_line.strip() + "\n")
    return {"ok": True, "trusted_key": str(path), "changed": current is None}


# -- runtime --------------------------------------------------------------------------------
def install_runtime(
    root: Path,
    release: str,
    key: str,
    python: str,
    requirements: list[str],
    offline: bool,
    pip_args: list[str],
) -> dict[str, Any]:
    """Create runtimes/<key>/venv once (pip from the wheelhouse, offline or with the index), link it."""
    runtime = root / "runtimes" / key
    installed = False
    t0 = time.monotonic()
    if not (runtime / ".complete").is_file():
        # built in place (venvs hard-code their path); .complete is written last, so a half-built
        # runtime from an interrupted flash is wiped and rebuilt, never used
        shutil.rmtree(runtime, ignore_errors=True)
        _run([python, "-m", "venv", str(runtime / "venv")], "create the venv")
        pip = [
            str(runtime / "venv" / "bin" / "python"),
            "-m",
            "pip",
            "install",
            "--disable-pip-version-check",
            "--no-warn-script-location",
            "--find-links",
            str(root / "wheelhouse"),
        ]
        pip += ["--no-index"] if offline else []
        _run(pip + pip_args + requirements, "install the edge runtime")
        (runtime / ".complete").write_text(
            json.dumps({"requirements": requirements, "offline": offline})
        )
        installed = True
    link = root / "releases" / release / "runtime"
    _replace_symlink(link, f"../../runtimes/{key}")
    packages = install_env_packages(
        root / "releases" / release, runtime / "venv" / "bin" / "python"
    )
    return {
        "ok": True,
        "runtime": str(runtime),
        "installed": installed,
        "env_packages": packages,
        "seconds": time.monotonic() - t0,
        "python": str(runtime / "venv" / "bin" / "python"),
    }


def install_env_packages(release: Path, python: Path) -> list[str]:
    """Install the release's env wheels, without dependencies, into its own packages/ folder
    (once; the service puts it on sys.path). The shared runtime venv is left as it is."""
    wheels = sorted(_env_wheels(release))
    target = release / "packages"
    if wheels and not target.is_dir():
        tmp = release / ".packages.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        pip = [str(python), "-m", "pip", "install", "--disable-pip-version-check", "--no-deps"]
        _run(
            pip + ["--no-index", "--target", str(tmp)] + [str(release / w) for w in wheels],
            "install the env packages",
        )
        os.rename(tmp, target)  # whole or not at all
    return [Path(w).name for w in wheels]


def _run(argv: list[str], what: str) -> None:
    r = subprocess.run(argv, capture_output=True, text=True)
    if r.returncode != 0:
        tail = (r.stderr or r.stdout).strip().splitlines()[-6:]
        raise Refused(
            f"could not {what} ({' '.join(argv[:3])} ... exit {r.returncode}): " + " | ".join(tail)
        )


# -- switching ------------------------------------------------------------------------------
def _replace_symlink(link: Path, target: str) -> None:
    """Atomically point link at target: the same syscalls as `ln -sfn target tmp && mv -T tmp link`."""
    tmp = link.with_name(f".{link.name}.tmp{os.getpid()}")
    if tmp.is_symlink():
        tmp.unlink()
    os.symlink(target, tmp)
    os.replace(tmp, link)


def _history(root: Path, event: dict[str, Any]) -> None:
    with open(root / "state" / "history.jsonl", "a") as f:
        f.write(
            json.dumps({"at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), **event}) + "\n"
        )


def switch(root: Path, release: str, reason: str = "flash") -> dict[str, Any]:
    """current -> releases/<release>; previous -> what current was. Then restart the service."""
    if not (root / "releases" / release / "runtime").exists():
        raise Refused(f"release {release} is not staged with a runtime; flash it again")
    old = _link_name(root / "current")
    if old and old != release:
        _replace_symlink(root / "previous", f"releases/{old}")
    _replace_symlink(root / "current", f"releases/{release}")
    _history(root, {"event": reason, "from": old, "to": release})
    return {"ok": True, "previous": old, "current": release, "service": restart_service(root)}


def rollback(root: Path, allow_empty: bool = False, restore_previous: str = "") -> dict[str, Any]:
    """Swap current and previous; with no previous (a failed first flash), remove current if allowed.

    restore_previous (a failed flash undoing itself): afterwards point previous back at that
    release ("-": none), so a later rollback never lands on the release that just failed.
    """
    prev, cur = _link_name(root / "previous"), _link_name(root / "current")
    if prev and (root / "releases" / prev).is_dir():
        result = switch(root, prev, reason="rollback")
        if restore_previous == "-" and (root / "previous").is_symlink():
            (root / "previous").unlink()
        elif restore_previous and (root / "releases" / restore_previous).is_dir():
            _replace_symlink(root / "previous", f"releases/{restore_previous}")
        return {**result, "previous": _link_name(root / "previous"), "rolled_back_from": cur}
    if not allow_empty:
        raise Refused("no previous release on the device to roll back to")
    stop_service(root)
    if (root / "current").is_symlink():
        (root / "current").unlink()
    _history(root, {"event": "rollback", "from": cur, "to": None})
    return {
        "ok": True,
        "previous": None,
        "current": None,
        "rolled_back_from": cur,
        "service": "stopped",
    }


# -- the service ----------------------------------------------------------------------------
def _supervisor_pid(root: Path) -> int | None:
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
    if _release_kind(root / "current") == "llm":
        return f"no service for an llm bundle ({stop_service(root)})"
    unit = root / "current" / "splitedge.service"
    if _can_manage_systemd()[0] and unit.is_file():
        if not UNIT_PATH.is_file() or UNIT_PATH.read_text() != unit.read_text():
            prefix = [] if os.geteuid() == 0 else ["sudo", "-n"]
            _run(
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
    if _can_manage_systemd()[0] and UNIT_PATH.is_file():
        _systemctl("stop", UNIT_NAME)
        return "systemd: stopped"
    pid = _supervisor_pid(root)
    if pid is None:
        return "supervisor: not running"
    os.kill(pid, signal.SIGTERM)
    for _ in range(100):
        if _supervisor_pid(root) is None or _zombie(pid):
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
    systemd = _can_manage_systemd()[0] and UNIT_PATH.is_file()
    own_path = Path("/run/splitedge/service.json") if systemd else root / "state" / "service.json"
    try:
        own = json.loads(own_path.read_text())
    except (OSError, ValueError):
        own = {}
    if systemd:
        active = _systemctl("is-active", UNIT_NAME).stdout.strip()
        return {"manager": "systemd", "active": active, **own}
    pid = _supervisor_pid(root)
    return {"manager": "supervisor", "active": "active" if pid else "inactive", "pid": pid, **own}


def status(root: Path) -> dict[str, Any]:
    """Everything `splitedge status` shows."""
    health = root / "state" / "health.json"
    releases = (
        sorted(p.name for p in (root / "releases").iterdir())
        if (root / "releases").is_dir()
        else []
    )
    return {
        "ok": True,
        "root": str(root),
        "current": _link_name(root / "current"),
        "previous": _link_name(root / "previous"),
        "releases": releases,
        "kind": _release_kind(root / "current") if (root / "current").is_dir() else None,
        "last_health": json.loads(health.read_text()) if health.is_file() else None,
        "service": service_state(root),
        "trusted_key": _read_or_none(root / "etc" / "signing.pub"),
    }


# -- entry point ----------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="splitedge-device")
    p.add_argument(
        "op",
        choices=(
            "facts",
            "prepare",
            "stage",
            "discard",
            "trust-key",
            "runtime",
            "switch",
            "rollback",
            "restart",
            "stop",
            "status",
        ),
    )
    p.add_argument("--root", default=None)
    p.add_argument("--release", default="")
    p.add_argument("--key", default="")
    p.add_argument("--python", default="python3")
    p.add_argument("--offline", action="store_true")
    p.add_argument("--allow-empty", action="store_true")
    p.add_argument("--restore-previous", default="")
    p.add_argument("--requirement", action="append", default=[])
    p.add_argument("--pip-arg", action="append", default=[])
    a = p.parse_args(argv)
    root = Path(os.path.expanduser(a.root or os.environ.get("SPLITEDGE_ROOT") or DEFAULT_ROOT))
    try:
        ops = {
            "facts": lambda: facts(root),
            "prepare": lambda: prepare(root, a.release),
            "stage": lambda: stage(root, a.release),
            "discard": lambda: discard(root, a.release),
            "trust-key": lambda: trust_key(root, a.key),
            "runtime": lambda: install_runtime(
                root, a.release, a.key, a.python, a.requirement, a.offline, a.pip_arg
            ),
            "switch": lambda: switch(root, a.release),
            "rollback": lambda: rollback(root, a.allow_empty, a.restore_previous),
            "restart": lambda: {"ok": True, "service": restart_service(root)},
            "stop": lambda: {"ok": True, "service": stop_service(root)},
            "status": lambda: status(root),
        }
        out = ops[a.op]()
    except (Refused, OSError) as e:
        print(json.dumps({"ok": False, "error": str(e)}))
        return 1
    out.setdefault("root", str(root))
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
