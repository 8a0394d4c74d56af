"""Kernel shaping on the veth ends: `tbf` (+ a filler that keeps its bucket empty) or `netem`.

Why the filler: a token bucket lets a packet that finds the bucket full leave at once, so
on a quiet link a 512-byte request would cross a 1 Mbit/s tbf in 0 ms instead of 4.1 ms
(and a 20 kbit/s link would hand every step ~600 ms of free burst). A real serial link,
like netem's rate, makes every packet wait for its own transmission time. Keeping the
bucket empty with a lowest-priority filler flow restores that: our packet (pfifo_fast
band 1) always goes first, but must wait for the tokens of its own length. The error left
is the tokens the filler had not yet spent, under one filler packet (<= 0.25 ms by design,
or one 42-byte frame where that is longer: 17 ms at GPRS's 20 kbit/s).
"""

from __future__ import annotations

import functools
import os

from deploy.link.netns import PREFIX, delete, run
from deploy.link.profiles import ETHERNET_HEADER, PACKET_BYTES, LinkProfile

# tbf and netem meter a veth packet with its Ethernet header (ETHERNET_HEADER bytes)
BURST_BYTES = 1600  # strict: one full-size frame (1514 B) and a little rounding margin
MIN_FILLER_FRAME = 42  # Ethernet + IPv4 + UDP headers, empty payload
FILLER_ERROR_S = 0.25e-3  # largest serialisation time a filler packet may hide
NO_FILLER_ABOVE_KBIT = 24_000  # a free 1514-byte frame costs < 0.5 ms here anyway
TXQUEUELEN = 10_000
FILLER_PRIORITY = 2  # SO_PRIORITY TC_PRIO_BULK: pfifo_fast's lowest band (2); ours is band 1


@functools.cache
def missing(kind: str) -> str:
    """Why this kernel cannot run qdisc `kind` ('' if it can), probed once in a scratch namespace."""
    ns = f"{PREFIX}{os.getpid()}-probe"
    delete(ns)
    try:
        r = run(["ip", "netns", "add", ns], check=False)
        if r.returncode != 0:
            return f"cannot create a network namespace: {r.stderr.strip()}"
        argv = ["tc", "-n", ns, "qdisc", "add", "dev", "lo", "root", "handle", "1:"]
        args = {"netem": ["netem", "delay", "1ms"], "tbf": tbf_args(1000, 65536)}[kind]
        r = run([*argv, *args], check=False)
        if r.returncode != 0:
            return f"kernel has no sch_{kind} (tc: {r.stderr.strip().splitlines()[0]})"
        if kind == "tbf":
            r = run(["tc", "-n", ns, "qdisc", "add", "dev", "lo", "parent", "1:1", "pfifo_fast"],
                    check=False)  # fmt: skip
            if r.returncode != 0:
                return f"tbf cannot take a pfifo_fast child (tc: {r.stderr.strip()})"
        return ""
    finally:
        delete(ns)


def tbf_args(rate_kbit: float, queue_bytes: int, burst_bytes: int = 0) -> list[str]:
    """tc arguments of a token bucket at rate_kbit (tc's kbit is 1000 bit/s); strict by default."""
    burst = burst_bytes or BURST_BYTES
    return ["tbf", "rate", f"{rate_kbit:g}kbit", "burst", str(burst),
            "limit", str(max(queue_bytes, 2 * burst))]  # fmt: skip


def netem_args(rate_kbit: float, profile: LinkProfile) -> list[str]:
    """tc arguments of netem: one-way delay, uniform jitter, rate, and a packet limit."""
    # netem's limit counts packets still "in flight" too, so add the bandwidth-delay product.
    in_flight = rate_kbit * 1000 / 8 * (profile.delay_ms + profile.jitter_ms) / 1000
    limit = max(8, int((profile.queue_bytes + in_flight) // PACKET_BYTES) + 1)
    args = ["netem", "delay", f"{profile.delay_ms:g}ms"]
    if profile.jitter_ms:
        args += [f"{profile.jitter_ms:g}ms"]  # uniform in [-jitter, +jitter] without a table
    if profile.loss_pct:
        args += ["loss", "random", f"{profile.loss_pct:g}%"]
    return [*args, "rate", f"{rate_kbit:g}kbit", "limit", str(limit)]


def filler_frame_bytes(rate_kbit: float) -> int | None:
    """Size of the filler's frames at this rate, or None when the link is fast enough without."""
    if rate_kbit >= NO_FILLER_ABOVE_KBIT:
        return None
    bytes_per_s = rate_kbit * 1000 / 8
    largest = PACKET_BYTES + ETHERNET_HEADER
    return int(min(largest, max(MIN_FILLER_FRAME, bytes_per_s * FILLER_ERROR_S)))


def shape(ns: str, dev: str, kind: str, rate_kbit: float, profile: LinkProfile) -> None:
    """Replace the root qdisc of dev in ns with a tbf (+ pfifo_fast bands) or a netem.

    Both meter whole Ethernet frames (IP/TCP headers included), as a veth carries them.
    """
    base = ["tc", "-n", ns, "qdisc", "replace", "dev", dev, "root", "handle", "1:"]
    if kind == "netem":
        run([*base, *netem_args(rate_kbit, profile)])
        return
    strict = max(BURST_BYTES, profile.mtu + ETHERNET_HEADER + 86)  # one frame + the same margin
    run([*base, *tbf_args(rate_kbit, profile.queue_bytes, profile.burst_bytes or strict)])
    run(["tc", "-n", ns, "qdisc", "replace", "dev", dev, "parent", "1:1", "handle", "10:",
         "pfifo_fast"])  # fmt: skip
    # pfifo_fast drops whatever arrives when txqueuelen packets wait, whatever the band, so
    # leave room for the filler's queue; TCP's small-queue logic keeps ours short anyway.
    run(["ip", "-n", ns, "link", "set", dev, "txqueuelen", str(TXQUEUELEN)])


def set_rate(ns: str, dev: str, kind: str, rate_kbit: float, profile: LinkProfile) -> None:
    """Change the rate of the root qdisc shape() made, in place (queue and child kept)."""
    base = ["tc", "-n", ns, "qdisc", "change", "dev", dev, "root", "handle", "1:"]
    if kind == "netem":
        run([*base, *netem_args(rate_kbit, profile)])
        return
    strict = max(BURST_BYTES, profile.mtu + ETHERNET_HEADER + 86)
    run([*base, *tbf_args(rate_kbit, profile.queue_bytes, profile.burst_bytes or strict)])


def unshape(ns: str, dev: str) -> None:
    """Back to the default qdisc; fine if there was nothing to remove."""
    run(["tc", "-n", ns, "qdisc", "del", "dev", dev, "root"], check=False)


def qdisc_kinds(ns: str, dev: str) -> list[str]:
    """Kinds of the qdiscs on dev in ns (e.g. ['tbf', 'pfifo_fast'])."""
    out = run(["tc", "-n", ns, "qdisc", "show", "dev", dev], check=False).stdout
    return [line.split()[1] for line in out.splitlines() if line.startswith("qdisc ")]
