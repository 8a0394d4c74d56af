"""A Debian arm64 root file system for the emulated Raspberry Pi, built once and cached.

mmdebstrap builds it from deb.debian.org (its maintainer scripts run under
qemu through binfmt.py), with what a Pi running Raspberry Pi OS Bookworm
offers a flash: Python 3.11 with venv, rsync, and Mesa's EGL/GLES (llvmpipe).
It lives under the splitedge cache dir, named by suite and a digest of the
package list, so a changed list builds a new one beside the old. Emulators
never write to it: each one mounts it as the lower layer of its own overlay.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import shutil
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

from deploy.emulate import binfmt
from deploy.flash.runtime import cache_dir
from splitedge.errors import SplitedgeError

SUITE = "bookworm"
MIRROR = "http://deb.debian.org/debian"
PACKAGES = ("python3", "python3-venv", "rsync", "libegl1", "libgles2", "libgl1-mesa-dri")
# docs, man pages and translations are a third of a minimal system and nobody reads them there
EXCLUDE = ("/usr/share/doc/*", "/usr/share/man/*", "/usr/share/locale/*")
DONE = ".splitedge-rootfs.json"  # written last: a folder without it is an interrupted build


def rootfs_path(suite: str = SUITE, packages: tuple[str, ...] = PACKAGES) -> Path:
    """Where the root file system for this suite and package list is (or will be) cached."""
    key = hashlib.sha256(json.dumps([suite, "arm64", MIRROR, sorted(packages)]).encode())
    return cache_dir() / "rootfs" / f"{suite}-arm64-{key.hexdigest()[:12]}"


def built(path: Path) -> dict | None:
    """The build record of a finished root file system, or None."""
    try:
        return dict(json.loads((path / DONE).read_text()))
    except (OSError, ValueError):
        return None


def ensure_rootfs(
    suite: str = SUITE,
    packages: tuple[str, ...] = PACKAGES,
    say: Callable[[str], None] = lambda _: None,
) -> Path:
    """The cached root file system, built first when missing (minutes; say() is told so)."""
    path = rootfs_path(suite, packages)
    if built(path):
        return path
    line = binfmt.tools_problem(need_builder=True)
    if line:
        raise SplitedgeError(line)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.with_name(path.name + ".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # a second builder waits, then finds it built
        if built(path):
            return path
        say(f"building the arm64 {suite} root file system once (a few minutes) into {path}")
        _build(path, suite, packages)
    return path


def _build(path: Path, suite: str, packages: tuple[str, ...]) -> None:
    tmp = path.with_name(path.name + ".building")
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.rmtree(path, ignore_errors=True)
    t0 = time.monotonic()
    binfmt.acquire()
    try:
        argv = [
            "mmdebstrap",
            "--mode=root",
            "--variant=apt",
            "--architectures=arm64",
            f"--include={','.join(packages)}",
            *(f"--dpkgopt=path-exclude={p}" for p in EXCLUDE),
            suite,
            str(tmp),
            MIRROR,
        ]
        r = subprocess.run(argv, capture_output=True, text=True)
    finally:
        binfmt.release()
    if r.returncode != 0:
        shutil.rmtree(tmp, ignore_errors=True)
        tail = [ln for ln in r.stderr.splitlines() if ln.startswith("E:")][-1:] or [
            r.stderr.strip()[-200:]
        ]
        raise SplitedgeError(
            f"could not build the arm64 root file system (mmdebstrap: {tail[0]}); is "
            f"{MIRROR} reachable? run again to retry"
        )
    size = subprocess.run(["du", "-sm", str(tmp)], capture_output=True, text=True).stdout
    record = {
        "suite": suite,
        "packages": sorted(packages),
        "mirror": MIRROR,
        "build_seconds": round(time.monotonic() - t0, 1),
        "size_mb": int(size.split()[0]) if size.split() else None,
        "python": _python_version(tmp),
    }
    (tmp / DONE).write_text(json.dumps(record, indent=1))
    tmp.rename(path)


def _python_version(root: Path) -> str | None:
    """The python3 the root file system ships (Debian's, read from its dpkg status)."""
    try:
        status = (root / "var/lib/dpkg/status").read_text()
    except OSError:
        return None
    for block in status.split("\n\n"):
        if block.startswith("Package: python3\n"):
            for line in block.splitlines():
                if line.startswith("Version:"):
                    return line.split(":", 1)[1].strip()
    return None
