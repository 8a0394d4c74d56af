"""An emulated device: a real OpenSSH sshd with a throwaway key, for flashing without hardware.

Where root allows, sshd runs in its own network namespace behind a veth pair
(the device is 10.213.N.2, this machine 10.213.N.1) and in a memory cgroup
limited to the profile's RAM; where not, it listens on 127.0.0.1 and runs
unconfined. `capabilities` says which ran. The device's file system is this
machine's: its install root is <workdir>/device/opt/splitedge, announced to
every ssh session through sshd's SetEnv SPLITEDGE_ROOT (and the profile's
architecture as SPLITEDGE_EMULATED_ARCH, since pre-flight would otherwise
see this machine's). With arch="arm64" the sessions run a Debian arm64 userland
under qemu instead (arm64.py): the install root is then /opt/splitedge inside it,
the same host folder bound there.
"""

from __future__ import annotations

import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil

from deploy.emulate.arm64 import ARCHES, DEVICE_ROOT, Arm64Userland
from deploy.flash.preflight import requirements
from deploy.server_process import free_port
from splitedge.errors import SplitedgeError

SSHD = "/usr/sbin/sshd"
OWNERS = Path("/run/splitedge-emu")  # <namespace>.pid: who made each device's namespace
INSTALL_HINT = "install it with: apt-get install -y openssh-server rsync"


@dataclass
class Capabilities:
    """Which isolation the emulator got, and why not where it did not."""

    netns: bool = False
    cgroup: str | None = None  # "v1" or "v2"
    notes: list[str] = field(default_factory=list)

    def describe(self) -> str:
        net = "own network namespace (veth)" if self.netns else "loopback, shared network namespace"
        mem = f"memory limit via cgroup {self.cgroup}" if self.cgroup else "no memory limit"
        return f"{net}; {mem}" + (f" [{'; '.join(self.notes)}]" if self.notes else "")


def _run(argv: list[str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, capture_output=True, text=True)


def _memory_cgroup_parent() -> tuple[Path, str] | None:
    """This process's memory cgroup folder (v2 unified, or the v1 memory controller)."""
    try:
        lines = Path("/proc/self/cgroup").read_text().splitlines()
    except OSError:
        return None
    for line in lines:
        _, controllers, path = line.split(":", 2)
        if controllers == "" and Path("/sys/fs/cgroup/cgroup.controllers").is_file():
            p = Path("/sys/fs/cgroup") / path.lstrip("/")
            if (
                "memory" in (p / "cgroup.subtree_control").read_text()
                if (p / "cgroup.subtree_control").is_file()
                else False
            ):
                return p, "v2"
        elif "memory" in controllers.split(","):
            return Path("/sys/fs/cgroup/memory") / path.lstrip("/"), "v1"
    return None


class EmulatedDevice:
    """Start with `with EmulatedDevice("pi-zero-2w") as dev:`; flash to dev.host with dev.ssh_config."""

    def __init__(
        self,
        profile: str = "pi-zero-2w",
        workdir: Path | None = None,
        isolate: bool = True,
        name: str | None = None,
        arch: str = "native",
        rootfs: Path | None = None,
        memory_mb: int | None = None,
    ):
        if arch not in ARCHES:
            raise SplitedgeError(f"unknown --arch {arch!r}; choose from {', '.join(ARCHES)}")
        self.profile = requirements(profile)
        # the cgroup limit: the board's RAM unless asked otherwise (qemu's own memory counts too)
        self.memory_mb = memory_mb or self.profile.ram_mb
        if self.memory_mb < 64:
            raise SplitedgeError(f"--memory-mb {self.memory_mb}: give at least 64 (MB)")
        self.ident = secrets.token_hex(
            3
        )  # not `random`: test frameworks reseed it, names would collide
        self.name = name or f"{profile}-emu"
        self._own_workdir = workdir is None
        self.workdir = Path(workdir or tempfile.mkdtemp(prefix="splitedge-emu-")).resolve()
        self.isolate = isolate
        self.caps = Capabilities()
        self.address, self.port, self.host_address = "127.0.0.1", 22, "127.0.0.1"
        self.proc: subprocess.Popen[bytes] | None = None
        self._netns: str | None = None
        self._cgroup: Path | None = None
        self._owner: Path | None = None
        self.arm64 = Arm64Userland(self.workdir, self.ident, rootfs) if arch == "arm64" else None

    # -- paths ------------------------------------------------------------------------------
    @property
    def root(self) -> Path:
        """The device's install root, as a path on this machine (same file system)."""
        return self.workdir / "device" / "opt" / "splitedge"

    @property
    def ssh_config(self) -> Path:
        return self.workdir / "ssh_config"

    @property
    def host(self) -> str:
        """What to pass to `splitedge flash --host` (an alias defined in ssh_config)."""
        return self.name

    # -- lifecycle --------------------------------------------------------------------------
    def start(self) -> EmulatedDevice:
        if not Path(SSHD).is_file() or not shutil.which("ssh-keygen"):
            raise SplitedgeError(f"the emulated device needs OpenSSH's sshd; {INSTALL_HINT}")
        if not shutil.which("rsync"):
            raise SplitedgeError(f"flashing needs rsync; {INSTALL_HINT}")
        self._claim_workdir()
        if self.arm64 is not None:
            try:
                self.arm64.prepare(say=lambda line: print(line, file=sys.stderr, flush=True))
            except BaseException:
                self.stop()
                raise
        keys = self.workdir / "keys"
        keys.mkdir(parents=True, exist_ok=True)
        self.root.mkdir(parents=True, exist_ok=True)
        for name in ("host_ed25519", "client_ed25519"):
            if not (keys / name).exists():
                _check(
                    _run(
                        [
                            "ssh-keygen",
                            "-q",
                            "-t",
                            "ed25519",
                            "-N",
                            "",
                            "-C",
                            f"splitedge-emu-{name}",
                            "-f",
                            str(keys / name),
                        ]
                    ),
                    "make a throwaway key",
                )
        shutil.copy(keys / "client_ed25519.pub", keys / "authorized_keys")
        if self.isolate and os.geteuid() == 0:
            reap_stale()
            self._try_netns()
        else:
            self.caps.notes.append("not root: no namespace, no cgroup")
        if not self.caps.netns:
            self.port = free_port()
        Path("/run/sshd").mkdir(mode=0o755, exist_ok=True) if os.geteuid() == 0 else None
        self._write_sshd_config(keys)
        argv = [SSHD, "-D", "-e", "-f", str(self.workdir / "sshd_config")]
        if self.arm64 is not None:
            argv = self.arm64.wrap(argv, self.root, self.profile.profile)
        if self._netns:
            # nsenter, not `ip netns exec`: that remounts /sys, hiding the cgroup limit from pre-flight
            argv = ["nsenter", f"--net=/run/netns/{self._netns}", *argv]
        log = open(self.workdir / "sshd.log", "ab")  # noqa: SIM115 - lives as long as sshd
        self.proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=log, stderr=log)
        if self.isolate and os.geteuid() == 0:
            self._try_cgroup(self.proc.pid)
        self._wait_listening()
        self._write_ssh_config(keys)
        return self

    def _claim_workdir(self) -> None:
        """One emulator per work folder: a second one would rewrite the first one's keys and
        ssh_config under it. A folder whose emulator died is taken over."""
        owner = self.workdir / "emulator.pid"
        try:
            self.workdir.mkdir(parents=True, exist_ok=True)
            pid = int(owner.read_text().strip() or 0) if owner.is_file() else 0
        except (OSError, ValueError) as e:
            raise SplitedgeError(
                f"cannot use --workdir {self.workdir}: {getattr(e, 'strerror', e)}; choose a "
                "folder you can write"
            ) from e
        if pid and pid != os.getpid() and psutil.pid_exists(pid):
            raise SplitedgeError(
                f"--workdir {self.workdir} belongs to a running emulator (pid {pid}); stop it "
                f"(Ctrl-C where it runs, or kill {pid}) or pass another --workdir"
            )
        if pid == os.getpid() and (self.workdir / "sshd.pid").is_file() and self.proc is None:
            sshd = int((self.workdir / "sshd.pid").read_text().strip() or 0)
            if sshd and psutil.pid_exists(sshd):
                raise SplitedgeError(
                    f"--workdir {self.workdir} belongs to another emulated device in this "
                    "process; pass another workdir"
                )
        owner.write_text(str(os.getpid()))
        self._owner = owner

    def _try_netns(self) -> None:
        ns, host_if, dev_if = f"se-{self.ident}", f"seh{self.ident}", f"sed{self.ident}"
        used = _run(["ip", "-4", "addr"]).stdout if shutil.which("ip") else ""
        free = [n for n in range(1, 255) if f"10.213.{n}." not in used]
        if not free:
            self.caps.notes.append("no network namespace (10.213.0.0/16 is full)")
            return
        net = f"10.213.{secrets.choice(free)}"
        steps = [
            ["ip", "netns", "add", ns],
            ["ip", "link", "add", host_if, "type", "veth", "peer", "name", dev_if],
            ["ip", "link", "set", dev_if, "netns", ns],
            ["ip", "addr", "add", f"{net}.1/30", "dev", host_if],
            ["ip", "link", "set", host_if, "up"],
            ["ip", "netns", "exec", ns, "ip", "addr", "add", f"{net}.2/30", "dev", dev_if],
            ["ip", "netns", "exec", ns, "ip", "link", "set", dev_if, "up"],
            ["ip", "netns", "exec", ns, "ip", "link", "set", "lo", "up"],
        ]
        self._netns, self._veth = ns, host_if
        OWNERS.mkdir(exist_ok=True)
        (OWNERS / f"{ns}.pid").write_text(str(os.getpid()))
        for argv in steps:
            r = _run(argv) if shutil.which("ip") else None
            if r is None or r.returncode != 0:
                self.caps.notes.append(
                    f"no network namespace ({' '.join(argv[:3])}: "
                    f"{(r.stderr.strip() if r else 'no ip command')[:80]})"
                )
                self._drop_netns()
                return
        self.caps.netns = True
        self.address, self.host_address = f"{net}.2", f"{net}.1"

    def _try_cgroup(self, pid: int) -> None:
        found = _memory_cgroup_parent()
        if found is None:
            self.caps.notes.append("no writable memory cgroup")
            return
        parent, version = found
        group = parent / f"splitedge-emu-{self.ident}"
        limit = str(self.memory_mb * 2**20)
        try:
            group.mkdir()
            (group / ("memory.max" if version == "v2" else "memory.limit_in_bytes")).write_text(
                limit
            )
            (group / "cgroup.procs").write_text(str(pid))
        except OSError as e:
            self.caps.notes.append(f"no memory cgroup ({e.strerror} at {group})")
            if group.is_dir():
                group.rmdir()
            return
        self._cgroup, self.caps.cgroup = group, version

    def _write_sshd_config(self, keys: Path) -> None:
        env = (
            f"SPLITEDGE_ROOT={self.root} SPLITEDGE_EMULATED_ARCH={self.profile.arch[0]} "
            f"SPLITEDGE_EMULATED_PROFILE={self.profile.profile}"
        )
        if self.arm64 is not None:  # a real aarch64 userland: pre-flight sees its own uname
            env = f"SPLITEDGE_ROOT={DEVICE_ROOT} SPLITEDGE_EMULATED_PROFILE={self.profile.profile}"
        (self.workdir / "sshd_config").write_text(
            "\n".join(
                [
                    f"Port {self.port}",
                    f"ListenAddress {self.address}",
                    f"HostKey {keys / 'host_ed25519'}",
                    f"AuthorizedKeysFile {keys / 'authorized_keys'}",
                    f"PidFile {self.workdir / 'sshd.pid'}",
                    "UsePAM no",
                    "StrictModes no",
                    "PasswordAuthentication no",
                    "KbdInteractiveAuthentication no",
                    "PermitRootLogin prohibit-password",
                    "MaxStartups 64",
                    "LogLevel ERROR",
                    "Subsystem sftp internal-sftp",
                    f"SetEnv {env}",
                    *(self.arm64.sshd_lines() if self.arm64 is not None else []),
                    "",
                ]
            )
        )

    def _write_ssh_config(self, keys: Path) -> None:
        host_key = (keys / "host_ed25519.pub").read_text().split()[:2]
        known = self.address if self.port == 22 else f"[{self.address}]:{self.port}"
        (self.workdir / "known_hosts").write_text(f"{known} {' '.join(host_key)}\n")
        (self.ssh_config).write_text(
            "\n".join(
                [
                    f"Host {self.name}",
                    f"  HostName {self.address}",
                    f"  Port {self.port}",
                    "  User root",
                    f"  IdentityFile {keys / 'client_ed25519'}",
                    "  IdentitiesOnly yes",
                    f"  UserKnownHostsFile {self.workdir / 'known_hosts'}",
                    "  StrictHostKeyChecking yes",
                    "  LogLevel ERROR",
                    "",
                ]
            )
        )

    def _wait_listening(self, timeout_s: float = 10.0) -> None:
        end = time.monotonic() + timeout_s
        while time.monotonic() < end:
            assert self.proc is not None
            if self.proc.poll() is not None:
                log = (self.workdir / "sshd.log").read_text(errors="replace").strip()[-300:]
                self.stop()
                raise SplitedgeError(f"sshd exited at start: {log or '(no output)'}")
            try:
                with socket.create_connection((self.address, self.port), timeout=0.5):
                    return
            except OSError:
                time.sleep(0.05)
        self.stop()
        raise SplitedgeError(
            f"sshd did not listen on {self.address}:{self.port} within {timeout_s:.0f} s"
        )

    def ssh(self, *remote: str) -> subprocess.CompletedProcess[str]:
        """Run a command on the device (tests and demos)."""
        import shlex

        return _run(["ssh", "-F", str(self.ssh_config), self.host, "--", shlex.join(remote)])

    def set_network(self, up: bool) -> None:
        """Cut (or restore) the device's link, as a pulled cable would: its side of the veth."""
        if not self._netns:
            raise SplitedgeError(
                "this emulated device has no network namespace of its own (needs root): "
                "its network cannot be cut"
            )
        dev_if = f"sed{self.ident}"
        state = "up" if up else "down"
        _check(
            _run(["ip", "netns", "exec", self._netns, "ip", "link", "set", dev_if, state]),
            f"set the device's link {state}",
        )

    def processes(self) -> list[int]:
        """Pids in the device's cgroup (everything started through its sshd)."""
        if self._cgroup is None:
            return []
        try:
            return [int(p) for p in (self._cgroup / "cgroup.procs").read_text().split()]
        except OSError:
            return []

    def stop(self) -> None:
        """Power the device off: its service, sshd and whatever they started; remove namespace and cgroup."""
        t0 = time.monotonic()
        if self._cgroup is None and (self.root / "run" / "supervisor.pid").exists():
            from deploy.flash.device_base import stop_service  # no cgroup: ask the supervisor

            stop_service(self.root)
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None
        # only processes inside this device's cgroup: TERM, a moment to exit cleanly, then KILL
        for sig, grace in ((signal.SIGTERM, 2.0), (signal.SIGKILL, 5.0)):
            for pid in self.processes():
                try:
                    os.kill(pid, sig)
                except ProcessLookupError:
                    pass
            end = time.monotonic() + grace
            while self.processes() and time.monotonic() < end:
                time.sleep(0.05)
        if self._cgroup is not None:
            try:
                self._cgroup.rmdir()
            except OSError as e:
                self.caps.notes.append(f"cgroup {self._cgroup} left behind: {e.strerror}")
            self._cgroup = None
        self._drop_netns()
        if self.arm64 is not None:
            self.arm64.close()
        if self._owner is not None:
            self._owner.unlink(missing_ok=True)
            (self.workdir / "sshd.pid").unlink(missing_ok=True)
            self._owner = None
        self.stop_seconds = time.monotonic() - t0

    def _drop_netns(self) -> None:
        if self._netns:
            _run(["ip", "link", "del", self._veth])
            _run(["ip", "netns", "del", self._netns])
            (OWNERS / f"{self._netns}.pid").unlink(missing_ok=True)
            self._netns = None

    def cleanup(self) -> None:
        """stop() and delete the work folder if this object made it."""
        self.stop()
        if self._own_workdir:
            shutil.rmtree(self.workdir, ignore_errors=True)

    def __enter__(self) -> EmulatedDevice:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.cleanup()

    def describe(self) -> dict[str, Any]:
        return {
            "profile": self.profile.profile,
            "host": self.host,
            "ssh_config": str(self.ssh_config),
            "address": f"{self.address}:{self.port}",
            "root": str(self.root),
            "host_address_from_device": self.host_address,
            "isolation": self.caps.describe(),
            "memory_limit_mb": self.memory_mb if self.caps.cgroup else None,
            **(self.arm64.describe() if self.arm64 is not None else {}),
        }


def reap_stale() -> list[str]:
    """Remove what killed emulators left behind: a device namespace whose maker is dead and
    that holds no process (its veth goes with it), and empty device memory cgroups.
    Returns what was removed."""
    removed = []
    for owner in OWNERS.glob("se-*.pid") if OWNERS.is_dir() else []:
        ns = owner.name[: -len(".pid")]
        try:
            pid = int(owner.read_text().strip() or 0)
        except (OSError, ValueError):
            pid = 0
        busy = (
            _run(["ip", "netns", "pids", ns]).stdout.strip()
            if Path("/run/netns", ns).exists()
            else ""
        )
        if (pid and psutil.pid_exists(pid)) or busy:
            continue
        if Path("/run/netns", ns).exists():
            _run(["ip", "netns", "del", ns])
            removed.append(f"namespace {ns}")
        owner.unlink(missing_ok=True)
    found = _memory_cgroup_parent()
    for group in found[0].glob("splitedge-emu-*") if found else []:
        try:
            young = time.time() - group.stat().st_mtime < 60  # maybe a device starting now
            if not young and not (group / "cgroup.procs").read_text().split():
                group.rmdir()
                removed.append(f"cgroup {group.name}")
        except OSError:
            pass  # in use, or already gone
    return removed


def _check(r: subprocess.CompletedProcess[str], what: str) -> None:
    if r.returncode != 0:
        raise SplitedgeError(f"could not {what}: {r.stderr.strip()[-200:]}")
