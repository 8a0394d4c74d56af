"""Random packet loss on the kernel path without netem: nftables `numgen` on each veth's ingress.

This kernel has no sch_netem, but nftables' `numgen random` is built in. Each direction gets
a netdev-family table on the *receiving* veth end (uplink: the server's end; downlink: the
edge's end) that drops a packet when a fresh random number mod 1,000,000 falls under
loss_pct x 10,000: independent (Bernoulli) loss, as netem's `loss random`. Dropping at the
receiver's ingress, after the sender's tbf, means a lost packet has used its airtime and the
sender's TCP learns of the loss only as a real one would (duplicate ACKs or a timeout); a drop
on the sender's own egress would instead fail the send locally and be retried at once.
The filler's blackholed frames (10.231.8.0/23) are let through: they are ours, not traffic.
Two named counters, `seen` and `lost`, count packets, so the loss a run got is read exactly.
Bursty (Gilbert-Elliott) loss is not expressible with numgen alone (it has no state between
packets); netem's `loss gemodel` gives it where netem exists.
"""

from __future__ import annotations

import functools
import json
import os
import shutil
import subprocess
import time

from deploy.link.netns import PREFIX, delete, run

TABLE = "splitedge_loss"
SCALE = 1_000_000  # loss resolution: 0.0001%
FILLER_NETS = "10.231.8.0/23"
SO_RCVBUFFORCE = (
    33  # Linux; root may exceed rmem_max  # netns.FILLER_NET_TO_EDGE and FILLER_NET_TO_SERVER
)


def ruleset(dev: str, loss_pct: float) -> str:
    """nft script: count every packet arriving on dev, drop loss_pct of them at random."""
    cut = round(loss_pct / 100 * SCALE)
    return f"""table netdev {TABLE} {{
  counter seen {{ }}
  counter lost {{ }}
  chain ingress {{
    type filter hook ingress device "{dev}" priority 0; policy accept;
    ip daddr {FILLER_NETS} accept
    counter name "seen"
    numgen random mod {SCALE} < {cut} counter name "lost" drop
  }}
}}
"""


def _nft(ns: str, script: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    r = subprocess.run(
        ["ip", "netns", "exec", ns, "nft", "-f", "-"],
        input=script,
        capture_output=True,
        text=True,
        timeout=30,
    )
    if check and r.returncode != 0:
        from splitedge.errors import SplitedgeError

        raise SplitedgeError(f"nft in {ns} failed: {r.stderr.strip()}")
    return r


@functools.cache
def missing() -> str:
    """Why loss cannot be applied without netem here ('' if it can); probed once."""
    if shutil.which("nft") is None:
        return "`nft` not found (apt-get install nftables)"
    ns = f"{PREFIX}{os.getpid()}-lossprobe"
    delete(ns)
    try:
        r = run(["ip", "netns", "add", ns], check=False)
        if r.returncode != 0:
            return f"cannot create a network namespace: {r.stderr.strip()}"
        r = _nft(ns, ruleset("lo", 1.0), check=False)
        if r.returncode != 0:
            return f"nftables numgen unavailable: {r.stderr.strip().splitlines()[0]}"
        return ""
    finally:
        delete(ns)


def apply(ns: str, dev: str, loss_pct: float) -> None:
    """Drop loss_pct of the packets arriving on dev in ns (replaces an earlier table)."""
    clear(ns)
    _nft(ns, ruleset(dev, loss_pct))


def clear(ns: str) -> None:
    """Remove the loss table from ns; fine if there is none."""
    _nft(ns, f"destroy table netdev {TABLE}\n", check=False)
    _nft(ns, f"delete table netdev {TABLE}\n", check=False)  # nft < 1.0.8 has no destroy


def counts(ns: str) -> tuple[int, int]:
    """(packets seen, packets dropped) on the loss table in ns so far; (0, 0) without one."""
    r = run(["ip", "netns", "exec", ns, "nft", "-j", "list", "counters", "table", "netdev", TABLE],
            check=False)  # fmt: skip
    if r.returncode != 0:
        return 0, 0
    got = {}
    for item in json.loads(r.stdout).get("nftables", []):
        c = item.get("counter")
        if c:
            got[c["name"]] = int(c["packets"])
    return got.get("seen", 0), got.get("lost", 0)


def self_check(loss_pct: float = 10.0, packets: int = 20_000) -> list[dict[str, object]]:
    """Send `packets` numbered UDP datagrams each way across a lossy veth pair and count
    what arrives: one row per direction with configured and measured loss.

    Counts packets, never time, so a loaded machine cannot fail it. At 10% over 20,000
    packets the binomial spread is 0.2% absolute, so the 10% relative bar is ~4.7 sigma.
    Measured over the packets that reached the loss stage (nftables counts them)."""
    from deploy.link import netns

    pair = netns.NamespacePair(role="loss")
    rows: list[dict[str, object]] = []
    try:
        pair.create()
        apply(pair.server, netns.SERVER_IF, loss_pct)  # uplink arrives at the server's end
        apply(pair.edge, netns.EDGE_IF, loss_pct)
        for direction, src, dst, dst_ip in (
            ("up", pair.edge, pair.server, netns.SERVER_IP),
            ("down", pair.server, pair.edge, netns.EDGE_IP),
        ):
            got = count_across(src, dst, dst_ip, packets)
            seen, lost = counts(dst)
            # Loss is what the loss stage let in and the receiver never got: a loaded host can
            # also drop datagrams before the stage (the veth's backlog), which is not the link's.
            measured = 100.0 * (seen - got) / seen if seen else 100.0
            rows.append({
                "direction": direction, "packets": packets, "received": got,
                "nft_seen": seen, "nft_lost": lost, "dropped_before_stage": max(0, packets - seen),
                "loss_pct": loss_pct, "measured_pct": measured,
                "ok": seen >= packets // 2 and abs(measured - loss_pct) <= 0.1 * loss_pct,
            })  # fmt: skip
    finally:
        pair.destroy()
    return rows


def count_across(src: str, dst: str, dst_ip: str, packets: int) -> int:
    """Send `packets` UDP datagrams from namespace src to dst_ip in dst; how many arrived."""
    import socket
    import threading

    from deploy.link import netns

    got: list[int] = []
    port: list[int] = []
    ready, done = threading.Event(), threading.Event()

    def receive() -> None:
        netns.enter(dst)
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as r:
            r.setsockopt(socket.SOL_SOCKET, SO_RCVBUFFORCE, 64 << 20)  # never overflows
            r.bind((dst_ip, 0))
            port.append(r.getsockname()[1])
            r.settimeout(1.0)
            ready.set()
            n = 0
            while True:
                try:
                    r.recv(64)
                    n += 1
                except TimeoutError:
                    if done.is_set():
                        break
            got.append(n)

    def send() -> None:
        netns.enter(src)
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            for i in range(packets):
                s.sendto(i.to_bytes(8, "big"), (dst_ip, port[0]))
                if i % 64 == 63:  # paced, so the veth's backlog (1000 packets) drains under load
                    time.sleep(0.0005)
        done.set()

    rx = threading.Thread(target=receive, daemon=True)
    rx.start()
    if not ready.wait(60):
        raise RuntimeError("loss self-check receiver did not start")
    tx = threading.Thread(target=send, daemon=True)
    tx.start()
    tx.join(300)
    rx.join(300)
    return got[0] if got else 0
