"""Network namespaces for the kernel link backends: a server side and an edge side, one veth.

Names carry the owner's pid (`splitedge-<pid>-srv`, `splitedge-<pid>-edge`), so a sweep
can tell a namespace left by a dead run from one that a live run is using. Both veth ends
live inside the namespaces and are created there, never in the root namespace, so deleting
the two namespaces removes the veth pair and every qdisc on it.
"""

from __future__ import annotations

import ctypes
import os
import re
import shutil
import signal
import subprocess
import sys
from dataclasses import dataclass, field

import psutil

from splitedge.errors import SplitedgeError

PREFIX = "splitedge-"
_NAME = re.compile(rf"^{PREFIX}(\d+)-([a-z]+)$")
_CLONE_NEWNET = 0x40000000
_PR_SET_PDEATHSIG = 1
SERVER_IF, EDGE_IF = "splitedge-s", "splitedge-e"  # interface names inside the namespaces
SERVER_IP, EDGE_IP = "10.231.0.1", "10.231.0.2"  # private to the namespaces: never clash
FILLER_NET_TO_SERVER, FILLER_NET_TO_EDGE = "10.231.9.0/24", "10.231.8.0/24"  # blackholed


def run(argv: list[str], check: bool = True) -> subprocess.CompletedProcess[str]:
    """Run an ip/tc/ethtool command; on failure raise with its stderr."""
    r = subprocess.run(argv, capture_output=True, text=True, timeout=30)
    if check and r.returncode != 0:
        raise SplitedgeError(f"`{' '.join(argv)}` failed: {r.stderr.strip() or r.stdout.strip()}")
    return r


def capability() -> str:
    """Why namespaces cannot be used here ('' when they can): root and `ip` are needed."""
    if not sys.platform.startswith("linux"):
        return "network namespaces need Linux"
    if os.geteuid() != 0:
        return "network namespaces and tc need root (run as root, or use --link-backend proxy)"
    for tool in ("ip", "tc"):
        if shutil.which(tool) is None:
            return f"`{tool}` not found (install iproute2)"
    return ""


def enter(name: str) -> None:
    """Move the calling thread into network namespace `name` (sockets it opens live there)."""
    libc = ctypes.CDLL(None, use_errno=True)
    fd = os.open(f"/run/netns/{name}", os.O_RDONLY)
    try:
        if libc.setns(fd, _CLONE_NEWNET) != 0:
            err = ctypes.get_errno()
            raise OSError(err, f"setns into {name}: {os.strerror(err)}")
    finally:
        os.close(fd)


def die_with_parent(sig: int = signal.SIGTERM) -> None:
    """Ask Linux to send `sig` to this process when its parent dies (so nothing outlives a kill)."""
    if sys.platform.startswith("linux"):
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, int(sig), 0, 0, 0)


def raise_priority(nice: int = -10) -> bool:
    """Run this process ahead of ordinary load (root only; best effort): it plays the network,
    which must not be starved of CPU by whatever else shares the machine."""
    try:
        os.setpriority(os.PRIO_PROCESS, 0, nice)
    except (OSError, AttributeError):
        return False
    return True


def exec_prefix(name: str) -> list[str]:
    """argv prefix that runs a command inside namespace `name` (exec, so the pid stays)."""
    return ["nsenter", f"--net=/run/netns/{name}"]


def list_ours() -> list[str]:
    """Every namespace named splitedge-<pid>-<role>, whoever owns it."""
    if shutil.which("ip") is None:
        return []
    out = run(["ip", "netns", "list"], check=False).stdout
    return [line.split()[0] for line in out.splitlines() if line and _NAME.match(line.split()[0])]


def root_links_ours() -> list[str]:
    """Interfaces in the root namespace whose name starts with splitedge- (there should be none)."""
    if shutil.which("ip") is None:
        return []
    out = run(["ip", "-o", "link", "show"], check=False).stdout
    names = [line.split(":")[1].strip().split("@")[0] for line in out.splitlines() if ":" in line]
    return [n for n in names if n.startswith(PREFIX)]


def delete(name: str) -> None:
    """Kill what runs inside namespace `name`, then delete it; fine if it is already gone."""
    pids = run(["ip", "netns", "pids", name], check=False).stdout.split()
    for pid in pids:
        try:
            os.kill(int(pid), signal.SIGKILL)
        except (ProcessLookupError, ValueError):
            pass
    run(["ip", "netns", "del", name], check=False)


def sweep_stale() -> list[str]:
    """Delete namespaces (and root-ns links) left by splitedge runs whose process is gone."""
    removed = []
    for name in list_ours():
        m = _NAME.match(name)
        if m and not psutil.pid_exists(int(m.group(1))):
            delete(name)
            removed.append(name)
    for link in root_links_ours():
        m = re.match(rf"^{PREFIX}(\d+)", link)
        if m and not psutil.pid_exists(int(m.group(1))):
            run(["ip", "link", "del", link], check=False)
            removed.append(link)
    return removed


@dataclass
class NamespacePair:
    """Server and edge namespaces joined by a veth pair with segmentation offloads off."""

    owner: int = field(default_factory=os.getpid)
    role: str = ""  # lowercase letters; lets one process hold several pairs
    notes: list[str] = field(default_factory=list)

    @property
    def server(self) -> str:
        return f"{PREFIX}{self.owner}-{self.role}srv"

    @property
    def edge(self) -> str:
        return f"{PREFIX}{self.owner}-{self.role}edge"

    def create(self) -> NamespacePair:
        """Build both namespaces and the veth; on any failure remove what was built."""
        self.destroy()  # idempotent: a half-built pair from this pid is replaced
        try:
            self._build()
        except BaseException:
            self.destroy()
            raise
        return self

    def _build(self) -> None:
        s, e = self.server, self.edge
        run(["ip", "netns", "add", s])
        run(["ip", "netns", "add", e])
        for ns in (s, e):
            # No IPv6: its router and neighbour chatter would cross the link. No TCP
            # timestamps: 12 bytes on every packet that the profiles' IP-level rates leave out.
            run(["ip", "netns", "exec", ns, "sysctl", "-qw", "net.ipv6.conf.all.disable_ipv6=1",
                 "net.ipv6.conf.default.disable_ipv6=1", "net.ipv4.tcp_timestamps=0"])  # fmt: skip
        # Created inside the server namespace with its peer placed straight into the edge one.
        run(["ip", "-n", s, "link", "add", SERVER_IF, "type", "veth", "peer", "name", EDGE_IF])
        run(["ip", "-n", s, "link", "set", EDGE_IF, "netns", e])
        for ns, dev, ip in ((s, SERVER_IF, SERVER_IP), (e, EDGE_IF, EDGE_IP)):
            run(["ip", "-n", ns, "addr", "add", f"{ip}/30", "dev", dev])
            run(["ip", "-n", ns, "link", "set", "lo", "up"])
            run(["ip", "-n", ns, "link", "set", dev, "up"])
        # The filler flows (see tc.py) go to blackholed subnets on the far side, so they cross
        # the shaper and vanish without an answer.
        run(["ip", "-n", e, "route", "add", FILLER_NET_TO_SERVER, "via", SERVER_IP])
        run(["ip", "-n", s, "route", "add", "blackhole", FILLER_NET_TO_SERVER])
        run(["ip", "-n", s, "route", "add", FILLER_NET_TO_EDGE, "via", EDGE_IP])
        run(["ip", "-n", e, "route", "add", "blackhole", FILLER_NET_TO_EDGE])
        self._offloads_off()

    def _offloads_off(self) -> None:
        # With TSO/GSO/GRO a "packet" can be 64 KB, which a shaper meters as one lump.
        if shutil.which("ethtool") is None:
            self.notes.append(
                "ethtool missing: segmentation offloads left on (apt install ethtool)"
            )
            return
        for ns, dev in ((self.server, SERVER_IF), (self.edge, EDGE_IF)):
            argv = ["ip", "netns", "exec", ns, "ethtool", "-K", dev]
            run([*argv, "tso", "off", "gso", "off", "gro", "off"], check=False)
            feats = run(["ip", "netns", "exec", ns, "ethtool", "-k", dev], check=False).stdout
            on = [f for f in ("tcp-segmentation-offload", "generic-segmentation-offload",
                              "generic-receive-offload") if f"{f}: on" in feats]  # fmt: skip
            if on:
                self.notes.append(f"{dev}: could not turn off {', '.join(on)}")

    def destroy(self) -> None:
        """Remove both namespaces (and with them the veth and its qdiscs); safe to repeat."""
        existing = set(list_ours())
        for name in (self.edge, self.server):
            if name in existing:
                delete(name)

    def exists(self) -> bool:
        """Whether either namespace is still there."""
        return bool({self.server, self.edge} & set(list_ours()))
