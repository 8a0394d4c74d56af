"""Run aarch64 programs on this machine: qemu-user-static through the kernel's binfmt_misc.

The handler is registered with the F (fix-binary) flag, so the kernel opens
qemu-aarch64-static once, here, and every aarch64 program runs through it even
inside a chroot that has no qemu of its own. We register only when no enabled
F-flag aarch64 handler exists, and remove only what we registered, once the
last emulator that uses it (pids in OWNERS) has let go.
"""

from __future__ import annotations

import fcntl
import os
import shutil
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from splitedge.errors import SplitedgeError

BINFMT = Path("/proc/sys/fs/binfmt_misc")
FILESYSTEMS = Path("/proc/filesystems")  # lists binfmt_misc when the kernel has it
QEMU = "/usr/bin/qemu-aarch64-static"
NAME = "splitedge-aarch64"
# an aarch64 ELF executable's header (e_ident + e_type ET_EXEC/ET_DYN + e_machine 183) and the
# mask the Debian qemu package uses for it
MAGIC = b"\x7fELF\x02\x01\x01\x00\x00\x00\x00\x00\x00\x00\x00\x00\x02\x00\xb7\x00"
MASK = b"\xff\xff\xff\xff\xff\xff\xff\x00\xff\xff\xff\xff\xff\xff\xff\xff\xfe\xff\xff\xff"
OWNERS = Path("/run/splitedge-emu/binfmt-aarch64.owners")
APT = "apt-get install -y qemu-user-static"


def _hex(b: bytes) -> str:
    return "".join(f"\\x{c:02x}" for c in b)


def aarch64_handler() -> str | None:
    """The name of an enabled binfmt_misc entry that runs aarch64 ELF files with the F flag."""
    if not (BINFMT / "register").exists():
        return None
    for entry in sorted(BINFMT.iterdir()):
        if entry.name in ("register", "status"):
            continue
        try:
            text = entry.read_text()
        except OSError:
            continue
        fields = dict(ln.split(" ", 1) for ln in text.splitlines() if " " in ln)
        lines = text.splitlines()
        if (
            lines[:1] == ["enabled"]
            and fields.get("magic") == MAGIC.hex()
            and "F" in fields.get("flags:", "").strip()
        ):
            return entry.name
    return None


def problem() -> str | None:
    """One line saying what is missing to run aarch64 programs here, with the fix; None if nothing."""
    if not Path(QEMU).is_file():
        return f"running an arm64 device needs {QEMU}: {APT}"
    if os.geteuid() != 0:
        return "running an arm64 device needs root (binfmt_misc, chroot, mounts): run it as root"
    if not (BINFMT / "register").exists() and "binfmt_misc" not in FILESYSTEMS.read_text():
        return (
            "this kernel has no binfmt_misc, so it cannot run aarch64 programs through qemu: "
            "load it (modprobe binfmt_misc) or use the x86_64 emulator (no --arch)"
        )
    return None


def _mount() -> None:
    if (BINFMT / "register").exists():
        return
    r = subprocess.run(
        ["mount", "-t", "binfmt_misc", "binfmt_misc", str(BINFMT)], capture_output=True, text=True
    )
    if r.returncode != 0:
        raise SplitedgeError(
            f"could not mount binfmt_misc at {BINFMT} ({r.stderr.strip()[-120:]}): run "
            f"`mount -t binfmt_misc binfmt_misc {BINFMT}` as root, then try again"
        )


@contextmanager
def _owners() -> Iterator[list[int]]:
    """The live pids that use our registration, under a lock; the caller edits the list."""
    OWNERS.parent.mkdir(parents=True, exist_ok=True)
    with open(OWNERS.with_suffix(".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            pids = [int(p) for p in OWNERS.read_text().split()] if OWNERS.is_file() else []
        except ValueError:
            pids = []
        pids = [p for p in pids if Path(f"/proc/{p}").exists()]
        yield pids
        OWNERS.write_text("".join(f"{p}\n" for p in pids))


def acquire() -> str:
    """Make aarch64 programs runnable here; returns what was done, for the emulator's report."""
    line = problem()
    if line:
        raise SplitedgeError(line)
    _mount()
    with _owners() as pids:
        found = aarch64_handler()
        if found and found != NAME:
            return f"aarch64 via binfmt_misc entry {found} (already registered)"
        if not found:
            spec = f":{NAME}:M::{_hex(MAGIC)}:{_hex(MASK)}:{QEMU}:F"
            try:
                (BINFMT / "register").write_text(spec)
            except OSError as e:
                raise SplitedgeError(
                    f"could not register qemu-aarch64 with binfmt_misc ({e.strerror}); "
                    f"is {QEMU} installed ({APT})?"
                ) from e
        pids.append(os.getpid())
        return f"aarch64 via qemu-user-static, registered as binfmt_misc {NAME} (F flag)"


def release() -> None:
    """Let go of our registration; remove it when no other live emulator uses it."""
    if not (BINFMT / NAME).exists():
        return
    with _owners() as pids:
        while os.getpid() in pids:
            pids.remove(os.getpid())
        if not pids:
            try:
                (BINFMT / NAME).write_text("-1")  # "-1" removes the entry
            except OSError:
                pass


def tools_problem(need_builder: bool) -> str | None:
    """problem(), and mmdebstrap/arch-test when the root file system still has to be built."""
    line = problem()
    if line or not need_builder:
        return line
    missing = [t for t in ("mmdebstrap", "arch-test") if not shutil.which(t)]
    if missing:
        return (
            f"building the arm64 root file system needs {' and '.join(missing)}: "
            f"apt-get install -y {' '.join(missing)}"
        )
    return None
