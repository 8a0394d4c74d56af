"""The device side of flashing: a stdlib-only script the flasher pipes to the device's python3.

Run as ``ssh HOST -- python3 - OP --root R ...`` with this file (and the device_*
modules it imports, bundled by transport.device_script) on stdin, so the device
needs nothing but Python 3.9+ before its first flash. Every op prints one JSON
object on stdout; a refusal prints ``{"ok": false, "error": "..."}`` and exits 1.

Device layout under the root (default $SPLITEDGE_ROOT or /opt/splitedge)::

    incoming/<release>/     rsync target; resumable, never run from
    releases/<release>/     bundle/, probe.npz, service.json, release.json, splitedge.service, runtime -> ../../runtimes/<key>
    runtimes/<key>/venv/    the edge runtime, shared by releases that need the same one
    wheelhouse/             wheels carried by the flasher (the splitedge wheel; all deps with --offline)
    current, previous       symlinks into releases/, switched atomically (symlink + rename)
    state/                  commit.json (pending/committed/reverted), health.json, history.jsonl, service.json
    run/                    supervisor.pid, service.log, commit-watchdog.log, actions.sock
    etc/signing.pub         when present, every bundle must carry a valid signature by this key
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import shutil
import subprocess
import sys
import sysconfig
import time
from pathlib import Path
from typing import Any

from deploy.flash import device_commit as commit
from deploy.flash import device_manage as manage
from deploy.flash.device_base import (
    DEVICE_SETTINGS,
    Refused,
    can_manage_systemd,
    link_name,
    read_json,
    read_or_none,
    release_kind,
    replace_symlink,
    restart_service,
    run_or_refuse,
    service_state,
    stop_service,
)

DEFAULT_ROOT = "/opt/splitedge"
NOT_HASHED = {"manifest.json", "manifest.sig"}


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


def _gl_libraries() -> dict[str, str | None]:
    """The GL libraries the dynamic loader finds (libEGL, and libGLESv2 or libGL for the targets)."""
    import ctypes.util

    return {name: ctypes.util.find_library(name) for name in ("EGL", "GLESv2", "GL")}


def _existing_parent(p: Path) -> Path:
    while not p.exists() and p != p.parent:
        p = p.parent
    return p


def facts(root: Path, read_only: bool = False) -> dict[str, Any]:
    """What pre-flight compares with the device profile (read_only: a dry run's, changes nothing)."""
    if not read_only and (root / "state" / "commit.json").is_file():
        commit.settle(root)  # a pending release whose watchdog is gone reverts first
    txn = commit.transaction(root) or {}
    mem = _meminfo()
    limit = _cgroup_memory_limit()
    parent = _existing_parent(root)
    usage = shutil.disk_usage(parent)
    systemd_ok, systemd_why = can_manage_systemd()
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
        # the ABI its extension modules need (cpython-311-aarch64-linux-gnu on a Pi 4 on Bookworm)
        "python_abi": sysconfig.get_config_var("SOABI"),
        "python_exe": sys.executable,
        "venv": venv_ok,
        "glibc": "-".join(platform.libc_ver()),
        "gl": _gl_version(),
        "gl_libraries": _gl_libraries(),
        "ram_total_mb": mem.get("MemTotal", 0) // 2**20,
        "ram_limit_mb": (limit // 2**20) if limit else None,
        "ram_available_mb": mem.get("MemAvailable", 0) // 2**20,
        "disk_free_mb": usage.free // 2**20,
        "disk_path": str(parent),
        "root_writable": os.access(parent, os.W_OK) if parent != root else os.access(root, os.W_OK),
        "rsync": shutil.which("rsync") is not None,
        "systemd": systemd_ok,
        "systemd_reason": systemd_why,
        "trusted_key": read_or_none(root / "etc" / "signing.pub"),
        "current": link_name(root / "current"),
        "previous": link_name(root / "previous"),
        "current_server": _current_server(root),
        "device_config": read_json(root / "etc" / "device.json"),
        "pending": txn if txn.get("state") == "pending" else None,
    }


def _current_server(root: Path) -> str | None:
    settings = device_config(root)
    return str(settings["server"]) if settings.get("server") else None


def device_config(root: Path) -> dict[str, Any]:
    """The settings the current release runs with: etc/device.json over its service.json."""
    release = read_json(root / "current" / "service.json") or {}
    merged = {k: v for k, v in release.items() if k in DEVICE_SETTINGS}
    return {**merged, **(read_json(root / "etc" / "device.json") or {})}


def _user() -> str:
    try:
        import pwd

        return pwd.getpwuid(os.geteuid()).pw_name
    except (ImportError, KeyError):
        return str(os.geteuid())


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
    if (incoming / "release.json").is_file() and release_kind(incoming) != "llm":
        needs += ["probe.npz", "service.json", "splitedge.service"]  # llm: no service
    for need in needs:
        if not (incoming / need).is_file():
            raise Refused(
                f"transfer incomplete: {need} missing in {incoming}; flash again to resume"
            )
    problems = check_bundle_files(incoming / "bundle") + check_env_wheels(incoming)
    if problems:
        for problem in problems:  # rsync keeps same-size, same-time files: make it resend them
            name, _, why = problem.partition(": ")
            if why.startswith("sha256"):
                for base in (incoming / "bundle", incoming):
                    (base / name).unlink(missing_ok=True)
        raise Refused(
            "bundle on the device failed its hash check: " + "; ".join(problems) + " (the "
            "damaged files were removed from incoming/; flash again to resend them)"
        )
    if target.exists():
        if _same_files(incoming, target):
            shutil.rmtree(incoming)
            return {"ok": True, "release": str(target), "already_staged": True}
        if release in (link_name(root / "current"), link_name(root / "previous")):
            raise Refused(
                f"release {release} is in use on the device with different contents (files, signature "
                "or env packages); bump the bundle version (device settings such as the server change "
                "with `splitedge flash --reconfigure`)"
            )
        shutil.rmtree(target)  # an unused leftover (e.g. a refused earlier try): replace it whole
    os.rename(incoming, target)
    return {"ok": True, "release": str(target), "already_staged": False}


def _same_files(a: Path, b: Path) -> bool:
    """Whether two release folders carry the same bundle, signature, unit and release config."""
    # probe.npz follows from the bundle (and its zip timestamps differ run to run)
    for rel in ("bundle/manifest.json", "bundle/manifest.sig", "splitedge.service"):
        pa, pb = a / rel, b / rel
        if pa.is_file() != pb.is_file() or (pa.is_file() and _sha256(pa) != _sha256(pb)):
            return False
    # the device's settings (server, backend, ...) live in etc/device.json, not in the release
    return _release_config(a / "service.json") == _release_config(b / "service.json")


def _release_config(path: Path) -> dict[str, Any] | None:
    raw = read_json(path)
    return None if raw is None else {k: v for k, v in raw.items() if k not in DEVICE_SETTINGS}


def discard(root: Path, release: str) -> dict[str, Any]:
    """Remove a refused release, unless it is current or previous."""
    if release in (link_name(root / "current"), link_name(root / "previous")):
        return {"ok": True, "removed": False, "reason": "release is in use"}
    shutil.rmtree(root / "releases" / release, ignore_errors=True)
    return {"ok": True, "removed": True}


def trust_key(root: Path, key_line: str) -> dict[str, Any]:
    """Configure the public key every later bundle must be signed with (first flash only)."""
    path = root / "etc" / "signing.pub"
    current = read_or_none(path)
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
        run_or_refuse([python, "-m", "venv", str(runtime / "venv")], "create the venv")
        pip = [
            str(runtime / "venv" / "bin" / "python"),
            "-m",
            "pip",
            "install",
            "--disable-pip-version-check",
            "--no-warn-script-location",
            # no byte-compiling of every module installed (PyOpenGL alone ships ~2,000 the
            # encoder never imports): the health gate's imports compile what runs, before
            # the release goes live
            "--no-compile",
            "--find-links",
            str(root / "wheelhouse"),
        ]
        pip += ["--no-index"] if offline else []
        run_or_refuse(pip + pip_args + requirements, "install the edge runtime")
        (runtime / ".complete").write_text(
            json.dumps({"requirements": requirements, "offline": offline})
        )
        installed = True
    link = root / "releases" / release / "runtime"
    replace_symlink(link, f"../../runtimes/{key}")
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
        run_or_refuse(
            pip + ["--no-index", "--target", str(tmp)] + [str(release / w) for w in wheels],
            "install the env packages",
        )
        os.rename(tmp, target)  # whole or not at all
    return [Path(w).name for w in wheels]


def status(root: Path) -> dict[str, Any]:
    """Everything `splitedge status` shows."""
    if (root / "state" / "commit.json").is_file():
        commit.settle(root)
    txn = commit.transaction(root)
    if txn and txn["state"] == "pending":
        txn["seconds_left"] = round(txn["deadline_epoch"] - time.time(), 1)
    health = root / "state" / "health.json"
    return {
        "ok": True,
        "root": str(root),
        "machine": platform.machine(),  # the device's own `uname -m` (aarch64 on a Pi)
        "arch": os.environ.get("SPLITEDGE_EMULATED_ARCH") or platform.machine(),  # as facts()
        "python": platform.python_version(),
        "current": link_name(root / "current"),
        "previous": link_name(root / "previous"),
        "releases": manage.releases(root),
        "kind": release_kind(root / "current") if (root / "current").is_dir() else None,
        "last_health": read_json(health),
        "transaction": txn,
        "config": device_config(root),
        "service": service_state(root),
        "trusted_key": read_or_none(root / "etc" / "signing.pub"),
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
            "commit",
            "revert",
            "rollback",
            "restart",
            "stop",
            "status",
            "releases",
            "prune",
            "logs",
            "boot",
        ),
    )
    p.add_argument("--root", default=None)
    p.add_argument("--release", default="")
    p.add_argument("--key", default="")
    p.add_argument("--python", default="python3")
    p.add_argument("--offline", action="store_true")
    p.add_argument("--read-only", action="store_true")
    p.add_argument("--keep", type=int, default=3)
    p.add_argument("--lines", type=int, default=50)
    p.add_argument("--config", default="", help="the device settings, JSON (etc/device.json)")
    p.add_argument("--reason", default="flash")
    p.add_argument("--deadline", type=float, default=commit.DEFAULT_DEADLINE_S)
    p.add_argument("--id", default="")
    p.add_argument("--why", default="")
    p.add_argument("--to", default="")
    p.add_argument("--requirement", action="append", default=[])
    p.add_argument("--pip-arg", action="append", default=[])
    a = p.parse_args(argv)
    root = Path(os.path.expanduser(a.root or os.environ.get("SPLITEDGE_ROOT") or DEFAULT_ROOT))
    try:
        ops = {
            "facts": lambda: facts(root, a.read_only),
            "prepare": lambda: prepare(root, a.release),
            "stage": lambda: stage(root, a.release),
            "discard": lambda: discard(root, a.release),
            "trust-key": lambda: trust_key(root, a.key),
            "runtime": lambda: install_runtime(
                root, a.release, a.key, a.python, a.requirement, a.offline, a.pip_arg
            ),
            "switch": lambda: commit.begin(
                root, a.release, a.deadline, a.reason, json.loads(a.config) if a.config else None
            ),
            "commit": lambda: commit.commit(root, a.id, a.why),
            "revert": lambda: commit.revert(root, a.id, a.why or "reverted by the flasher"),
            "rollback": lambda: commit.rollback(root, a.to),
            "restart": lambda: {"ok": True, "service": restart_service(root)},
            "stop": lambda: {"ok": True, "service": stop_service(root)},
            "status": lambda: status(root),
            "releases": lambda: {"ok": True, "releases": manage.releases(root)},
            "prune": lambda: manage.prune(root, a.keep),
            "logs": lambda: manage.logs(root, a.lines),
            "boot": lambda: commit.settle_at_boot(root),
        }
        out = ops[a.op]()
    except (Refused, OSError) as e:
        print(json.dumps({"ok": False, "error": str(e)}))
        return 1
    out.setdefault("root", str(root))
    print(json.dumps(out))
    return 1 if a.op == "boot" and not out["ok"] else 0  # boot: the unit must not start


if __name__ == "__main__":
    sys.exit(main())
