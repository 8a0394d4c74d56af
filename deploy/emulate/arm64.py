"""What `--arch arm64` adds to the emulated device: every ssh session runs a Debian arm64 userland.

The sshd stays this machine's own (fast, x86_64) in the device's network
namespace; its ChrootDirectory is the device's overlay of the cached arm64 root
file system (rootfs.py, mounted by chroot_mounts.py in a private mount
namespace), so the shell, python3, rsync and the service it starts are aarch64
programs run by qemu-user-static (binfmt.py). Pre-flight then reads the real
`uname -m`, glibc and Python ABI from inside, with no SPLITEDGE_EMULATED_ARCH.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from pathlib import Path

from deploy.emulate import binfmt
from deploy.emulate.rootfs import built, ensure_rootfs, rootfs_path
from splitedge.errors import SplitedgeError

ARCHES = ("native", "arm64")
DEVICE_ROOT = "/opt/splitedge"  # the install root as the device's programs see it
HELPER = Path(__file__).with_name("chroot_mounts.py")
MOUNTS = Path("/run/splitedge-emu")  # chroot mount points: sshd wants root-owned, 0755 parents
# each board's Arm core as /proc/cpuinfo names it (implementer 0x41 = Arm): A53, A72, A57
CPU_PARTS = {"pi-zero-2w": "0xd03", "pi-4b": "0xd08", "jetson-nano": "0xd07"}


def cpuinfo(profile: str) -> str:
    """An aarch64 /proc/cpuinfo for the profile's core, one entry per CPU this machine gives us."""
    entry = (
        "processor\t: {n}\nBogoMIPS\t: 108.00\nFeatures\t: fp asimd evtstrm crc32 cpuid\n"
        "CPU implementer\t: 0x41\nCPU architecture: 8\nCPU variant\t: 0x0\n"
        f"CPU part\t: {CPU_PARTS.get(profile, '0xd08')}\nCPU revision\t: 3\n\n"
    )
    return "".join(entry.format(n=n) for n in range(len(os.sched_getaffinity(0))))


class Arm64Userland:
    """The arm64 root file system, binfmt registration and chroot for one emulated device."""

    def __init__(self, workdir: Path, ident: str, rootfs: Path | None = None):
        self.workdir = workdir
        self.ident = ident
        self.rootfs = rootfs
        self.mountpoint = MOUNTS / f"root-{ident}"
        self.binfmt_note = ""
        self._acquired = False

    def prepare(self, say: Callable[[str], None]) -> None:
        """Check the tools (one line with the fix), build or reuse the rootfs, register qemu."""
        line = binfmt.tools_problem(need_builder=self.rootfs is None and not built(rootfs_path()))
        if line:
            raise SplitedgeError(line)
        self.rootfs = self.rootfs or ensure_rootfs(say=say)
        if not built(self.rootfs):
            raise SplitedgeError(
                f"{self.rootfs} is not a finished arm64 root file system; remove it and run "
                "`splitedge device emulate --arch arm64` again to rebuild it"
            )
        self.binfmt_note = binfmt.acquire()
        self._acquired = True
        for d in (MOUNTS, self.mountpoint):  # chmod too: mkdir's mode is cut by the umask
            d.mkdir(exist_ok=True)
            d.chmod(0o755)

    def wrap(self, sshd_argv: list[str], install_root: Path, profile: str) -> list[str]:
        """sshd's command line, run after the mounts in a mount namespace of its own."""
        assert self.rootfs is not None
        overlay = self.workdir / "device" / "overlay"
        cpu = self.workdir / "device" / "cpuinfo"
        cpu.write_text(cpuinfo(profile))
        return [
            "unshare",
            "--mount",
            "--propagation",
            "private",
            "--",
            sys.executable,
            str(HELPER),
            str(self.rootfs),
            str(overlay),
            str(self.mountpoint),
            str(install_root),
            str(cpu),
            "--",
            *sshd_argv,
        ]

    def sshd_lines(self) -> list[str]:
        return [f"ChrootDirectory {self.mountpoint}"]

    def describe(self) -> dict[str, str]:
        return {
            "arch": "aarch64 (Debian arm64 userland under qemu-user-static: an emulation, "
            "not Pi speed)",
            "root_on_device": DEVICE_ROOT,
            "rootfs": str(self.rootfs),
            "binfmt": self.binfmt_note,
        }

    def close(self) -> None:
        """Let go of binfmt (removed when we were its last user) and the empty mount point."""
        if self._acquired:
            binfmt.release()
            self._acquired = False
        try:
            self.mountpoint.rmdir()  # its mounts went with the device's mount namespace
        except OSError:
            pass
