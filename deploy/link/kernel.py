"""Kernel link backends between a NamespacePair, and the automatic choice of backend.

- `netem`: netem on both veth ends (delay, jitter, rate, queue limit); a byte-counting
  proxy (no delay, no rate) in the edge namespace reads TCP segment counts.
- `tbf`: tbf on both ends for the rate, a filler that keeps each bucket empty (tc.py),
  and the userspace emulator (rate off) in the edge namespace for delay and jitter.
- `proxy`: the userspace emulator alone, in the root namespace; needs no root.
"""

from __future__ import annotations

import ipaddress
import os
import subprocess
import sys
from dataclasses import dataclass, field
from typing import Any

from deploy.link import loss, netns, tc
from deploy.link.process import ProxyProcess, read_line, reap
from deploy.link.profiles import PACKET_BYTES, LinkProfile
from deploy.link.trace import TraceDriver, load_trace
from splitedge.errors import SplitedgeError

BACKENDS = ("netem", "tbf", "proxy")
LOSS_BACKENDS = ("netem", "tbf")  # backends that drop packets at a profile's loss_pct
_FILLER_DEST = {"up": "10.231.9.9", "down": "10.231.8.8"}  # in netns.FILLER_NET_*


@dataclass
class BackendChoice:
    """Which backend runs and why the better ones do not."""

    name: str
    reasons: list[str] = field(default_factory=list)  # one line per backend passed over

    def describe(self) -> str:
        why = f" ({'; '.join(self.reasons)})" if self.reasons else ""
        return f"{self.name}{why}"


def unavailable(backend: str) -> str:
    """Why `backend` cannot run on this machine ('' when it can)."""
    if backend == "proxy":
        return ""
    return netns.capability() or tc.missing(backend)


def unsupported(profile: LinkProfile, backend: str) -> str:
    """What of profile `backend` cannot emulate ('' if all of it), so nothing is silently dropped."""
    lacks = []
    if profile.loss_pct and backend not in LOSS_BACKENDS:
        lacks.append(f"loss_pct {profile.loss_pct:g}")  # TCP over a proxy never loses bytes
    elif profile.loss_pct and backend == "tbf" and (why := loss.missing()):
        return f"link '{profile.name}': loss_pct needs netem or nftables here: {why}"
    if profile.burst_bytes and backend != "tbf":
        lacks.append(f"burst_bytes {profile.burst_bytes}")
    if (profile.up_trace or profile.down_trace) and backend == "proxy":
        lacks.append("a rate trace")
    if profile.tcp_rto_min_ms and backend == "proxy":
        lacks.append(f"tcp_rto_min_ms {profile.tcp_rto_min_ms:g}")  # a route setting in a netns
    if profile.mtu != PACKET_BYTES and backend == "proxy":
        lacks.append(f"mtu {profile.mtu}")  # a TCP proxy sees bytes, not packets
    if not lacks:
        return ""
    return (
        f"link '{profile.name}': the {backend} backend cannot emulate {', '.join(lacks)}; "
        "use --link-backend tbf (kernel, needs root) or drop those keys"
    )


def loss_method(backend: str) -> str:
    """How the backend drops packets, for the report."""
    if backend == "netem":
        return "netem `loss random` on each veth's egress"
    return "nftables numgen random drop on each veth's ingress (no sch_netem; deploy/link/loss.py)"


def jitter_method(backend: str) -> str:
    """How the backend applies a profile's jitter, for the report."""
    if backend == "netem":
        return "netem delay jitter (uniform, in the kernel)"
    return (
        "the userspace delay stage: per packet uniform in [-jitter_ms, +jitter_ms], order kept "
        "(no sch_netem; deploy/link/jitter.py)"
        if backend == "tbf"
        else "the userspace proxy: per packet uniform in [-jitter_ms, +jitter_ms], order kept"
    )


def choose_backend(requested: str = "auto") -> BackendChoice:
    """netem > tbf > proxy for 'auto'; a named backend that cannot run is a user error."""
    if requested not in ("auto", *BACKENDS):
        raise SplitedgeError(
            f"unknown link backend '{requested}'; choose auto, {', '.join(BACKENDS)}"
        )
    if requested != "auto":
        why = unavailable(requested)
        if why:
            raise SplitedgeError(
                f"link backend '{requested}' cannot run here: {why}; try --link-backend auto"
            )
        return BackendChoice(requested)
    reasons: list[str] = []
    for name in BACKENDS:
        why = unavailable(name)
        if not why:
            return BackendChoice(name, reasons)
        reasons.append(f"not {name}: {why}")
    raise AssertionError("the proxy backend is always available")


class KernelLink:
    """One link profile shaped by the kernel on the veth of a NamespacePair (a LinkEmulator)."""

    def __init__(
        self,
        pair: netns.NamespacePair,
        profile: LinkProfile,
        backend: str,
        port: int,
        seed: int = 0,
    ):
        if backend not in ("tbf", "netem"):
            raise ValueError(f"KernelLink backend must be tbf or netem, got {backend!r}")
        self.pair, self.profile, self.backend = pair, profile, backend
        self.netns = pair.edge
        self._proxy = ProxyProcess(
            profile,
            (netns.SERVER_IP, port),
            netns=pair.edge,
            rate=False,
            delay=backend == "tbf",  # netem delays in the kernel; the proxy only counts
            seed=seed,
            backend=backend,
        )
        self._filler: subprocess.Popen[str] | None = None
        self._drivers: list[TraceDriver] = []

    @property
    def address(self) -> str:
        """HOST:PORT inside the edge namespace that leads to the server through the link."""
        return self._proxy.address

    def start(self) -> KernelLink:
        """Shape both veth ends, start the filler (tbf) and the proxy; undo it all on failure."""
        try:
            p, pair = self.profile, self.pair
            if p.mtu != PACKET_BYTES:
                set_mtu(pair, p.mtu)
            if p.tcp_rto_min_ms:
                set_rto_min(pair, p.tcp_rto_min_ms)
            tc.shape(pair.edge, netns.EDGE_IF, self.backend, p.up_kbit, p)  # uplink leaves here
            tc.shape(pair.server, netns.SERVER_IF, self.backend, p.down_kbit, p)
            if p.loss_pct and self.backend == "tbf":
                loss.apply(pair.server, netns.SERVER_IF, p.loss_pct)  # uplink arrives here
                loss.apply(pair.edge, netns.EDGE_IF, p.loss_pct)
            if self.backend == "tbf" and not p.burst_bytes:  # a burst is the user's bucket
                self._start_filler()
            self._start_traces()
            self._proxy.start()
        except BaseException:
            self.close()
            raise
        return self

    def _start_traces(self) -> None:
        p, pair = self.profile, self.pair
        for path, ns, dev in ((p.up_trace, pair.edge, netns.EDGE_IF),
                              (p.down_trace, pair.server, netns.SERVER_IF)):  # fmt: skip
            if path:

                def set_rate(kbit: float, ns: str = ns, dev: str = dev) -> None:
                    tc.set_rate(ns, dev, self.backend, kbit, p)

                self._drivers.append(TraceDriver(load_trace(path), set_rate).start())

    @property
    def trace_changes(self) -> int:
        """Rate changes the trace drivers have applied so far."""
        return sum(d.changes for d in self._drivers)

    def _start_filler(self) -> None:
        specs = []
        for ns, rate, direction in (
            (self.pair.edge, self.profile.up_kbit, "up"),
            (self.pair.server, self.profile.down_kbit, "down"),
        ):
            frame = tc.filler_frame_bytes(rate)
            if frame is not None:
                specs.append(f"{ns}:{_FILLER_DEST[direction]}:{frame}")
        if not specs:
            return
        self._filler = subprocess.Popen(
            [sys.executable, "-m", "deploy.link.filler", *specs],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            env={**os.environ, "SPLITEDGE_OWNER": str(os.getpid())},
        )
        assert self._filler.stdout is not None
        if read_line(self._filler.stdout, 30.0).strip() != "filling":
            raise SplitedgeError("the tbf filler did not start; see `python -m deploy.link.filler`")

    def stats(self) -> dict[str, Any]:
        """Proxy counters; link_up/link_down are Ethernet frame bytes, what the qdiscs meter;
        pkts_/lost_up/down count packets the loss stage saw and dropped (tbf with loss)."""
        s = self._proxy.stats()
        s["rate_changes"] = self.trace_changes
        s["retrans"] = retrans_segs(self.pair.edge) + retrans_segs(self.pair.server)
        if self.profile.loss_pct and self.backend == "tbf":
            s["pkts_up"], s["lost_up"] = loss.counts(self.pair.server)
            s["pkts_down"], s["lost_down"] = loss.counts(self.pair.edge)
        return s

    def close(self) -> None:
        """Stop the proxy and filler and remove the qdiscs; safe to call twice."""
        self._proxy.close()
        for driver in self._drivers:
            driver.stop()
        self._drivers = []
        filler, self._filler = self._filler, None
        if filler is not None:
            reap(filler, 5.0)
        if self.pair.exists():
            loss.clear(self.pair.server)
            loss.clear(self.pair.edge)
            tc.unshape(self.pair.edge, netns.EDGE_IF)
            tc.unshape(self.pair.server, netns.SERVER_IF)
            if self.profile.mtu != PACKET_BYTES:
                set_mtu(self.pair, PACKET_BYTES)
            if self.profile.tcp_rto_min_ms:
                set_rto_min(self.pair, 0)

    def __enter__(self) -> KernelLink:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()


def retrans_segs(ns: str) -> int:
    """TCP segments retransmitted so far in namespace ns (/proc/net/snmp Tcp RetransSegs)."""
    out = netns.run(["ip", "netns", "exec", ns, "cat", "/proc/net/snmp"], check=False).stdout
    rows = [line.split()[1:] for line in out.splitlines() if line.startswith("Tcp:")]
    if len(rows) < 2 or "RetransSegs" not in rows[0]:
        return 0
    return int(rows[1][rows[0].index("RetransSegs")])


def set_mtu(pair: netns.NamespacePair, mtu: int) -> None:
    """The MTU of both veth ends (TCP then sends segments that fit it)."""
    for ns, dev in ((pair.edge, netns.EDGE_IF), (pair.server, netns.SERVER_IF)):
        netns.run(["ip", "-n", ns, "link", "set", "dev", dev, "mtu", str(mtu)])


def set_rto_min(pair: netns.NamespacePair, ms: float) -> None:
    """TCP's minimum retransmission timeout on the veth route of both ends (0: the kernel's
    200 ms). It bounds both the RTO and, for a lone segment in flight, the tail loss probe, so
    on a short round trip a lost segment costs ~ms instead of >= 200 ms."""
    for ns, dev, ip in ((pair.edge, netns.EDGE_IF, netns.EDGE_IP),
                        (pair.server, netns.SERVER_IF, netns.SERVER_IP)):  # fmt: skip
        net = str(ipaddress.ip_interface(f"{ip}/30").network)
        extra = ["rto_min", f"{ms:g}ms"] if ms else []
        netns.run(["ip", "-n", ns, "route", "replace", net, "dev", dev, "proto", "kernel",
                   "scope", "link", "src", ip, *extra])  # fmt: skip


def open_link(
    choice: str,
    profile: LinkProfile,
    server: tuple[str, int],
    pair: netns.NamespacePair | None,
    seed: int = 0,
) -> KernelLink | ProxyProcess:
    """A not yet started link of backend `choice` in front of the server at `server`."""
    if choice == "proxy":
        return ProxyProcess(profile, server, seed=seed)
    if choice == "remote":  # a real path: only count the bytes that cross it
        return ProxyProcess(profile, server, rate=False, delay=False, seed=seed)
    if pair is None:
        raise ValueError(f"the {choice} backend needs a NamespacePair")
    return KernelLink(pair, profile, choice, server[1], seed=seed)
