"""Mount the arm64 device's file system, then become its sshd (run inside `unshare --mount`).

Usage: python chroot_mounts.py LOWER OVERLAY MOUNTPOINT INSTALL_ROOT CPUINFO -- SSHD ARGS...

In the emulator's private mount namespace: an overlay of the cached root file
system (LOWER, never written) with this device's own writable layer (OVERLAY),
/proc, /sys (the cgroup limit pre-flight reads) and /dev, and the host folder
INSTALL_ROOT bound at /opt/splitedge, so the host sees the install root where the
x86_64 emulator keeps it, and CPUINFO over /proc/cpuinfo: qemu-user 7.2 shows the
host's x86 one, which arm CPU probes cannot parse (onnxruntime's segfaults at import).
All of it vanishes with the namespace, i.e. with the
last process of the device. Stdlib only; errors are one line on stderr (sshd.log).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path


def _mount(*argv: str) -> None:
    r = subprocess.run(["mount", *argv], capture_output=True, text=True)
    if r.returncode != 0:
        sys.exit(f"arm64 device: mount {' '.join(argv)} failed: {r.stderr.strip()}")


def main(argv: list[str]) -> None:
    split = argv.index("--")
    lower, overlay, mountpoint, install_root, cpuinfo = (Path(a) for a in argv[:split])
    sshd = argv[split + 1 :]
    upper, work = overlay / "upper", overlay / "work"
    for d in (upper, work):
        d.mkdir(parents=True, exist_ok=True)
    os.chmod(upper, 0o755)  # the chroot's / : sshd refuses a group- or world-writable one
    _mount(
        "-t",
        "overlay",
        "overlay",
        "-o",
        f"lowerdir={lower},upperdir={upper},workdir={work}",
        str(mountpoint),
    )
    _mount("-t", "proc", "proc", str(mountpoint / "proc"))
    _mount("--bind", str(cpuinfo), str(mountpoint / "proc" / "cpuinfo"))
    _mount("--rbind", "/sys", str(mountpoint / "sys"))
    _mount("--rbind", "/dev", str(mountpoint / "dev"))
    (mountpoint / "opt" / "splitedge").mkdir(parents=True, exist_ok=True)
    _mount("--bind", str(install_root), str(mountpoint / "opt" / "splitedge"))
    os.execv(sshd[0], sshd)


if __name__ == "__main__":
    main(sys.argv[1:])
