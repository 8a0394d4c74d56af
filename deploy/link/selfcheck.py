"""Self-check of a link backend against theory: one message over 1 Mbit/s with 20 ms each way.

A request of N bytes and a 1-byte reply take 2 x 20 ms + N * 8 / 1 Mbit/s: 229.4 ms of
serialisation for 28 KB and 4.1 ms for 512 B, plus the 40 ms round trip. Each backend
must land within 5% of that. `link_theory_ms` also charges the bytes the backend itself
metered for data (Ethernet/IP/TCP headers for the kernel backends), which is what it
should match closely; the 5% bar is against the plain theory.
"""

from __future__ import annotations

import socket
import statistics
import threading
import time
from collections.abc import Callable
from typing import Any

from deploy.link import netns
from deploy.link.kernel import open_link
from deploy.link.profiles import LinkProfile, bound_ms

PROFILE = LinkProfile(
    "selfcheck", up_kbit=1000, down_kbit=1000, delay_ms=20, queue_bytes=65536,
    source="issue 4: 1 Mbit/s, 20 ms one-way",
)  # fmt: skip
SIZES = (28 * 1024, 512)
TOLERANCE = 0.05


def _in_thread(ns: str | None, fn: Callable[[], Any]) -> Any:
    """Run fn in a fresh thread that first enters namespace ns (the caller's thread stays put)."""
    box: dict[str, Any] = {}

    def target() -> None:
        try:
            if ns:
                netns.enter(ns)
            box["value"] = fn()
        except BaseException as e:  # re-raised in the caller
            box["error"] = e

    t = threading.Thread(target=target, daemon=True)
    t.start()
    t.join()
    if "error" in box:
        raise box["error"]
    return box.get("value")


def _echo_server(sock: socket.socket) -> None:
    """Answer each length-prefixed message with one byte once all of it has arrived."""
    conn, _ = sock.accept()
    conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    with conn:
        while True:
            head = conn.recv(4, socket.MSG_WAITALL)
            if len(head) < 4:
                return
            left = int.from_bytes(head, "big")
            while left:
                chunk = conn.recv(min(left, 65536))
                if not chunk:
                    return
                left -= len(chunk)
            conn.sendall(b"k")


def _exchange(conn: socket.socket, size: int) -> float:
    t0 = time.perf_counter()
    conn.sendall((size - 4).to_bytes(4, "big") + b"\0" * (size - 4))
    if conn.recv(1) != b"k":
        raise ConnectionError("self-check echo server went away")
    return (time.perf_counter() - t0) * 1e3


def run_self_check(backend: str, repeats: int = 5, idle_s: float = 0.15) -> list[dict[str, Any]]:
    """Time SIZES over PROFILE through `backend`; one row per size with theory and error."""
    pair = netns.NamespacePair(role="check") if backend != "proxy" else None
    try:
        if pair is not None:
            pair.create()
        host = netns.SERVER_IP if pair else "127.0.0.1"
        server_ns = pair.server if pair else None
        listener = _in_thread(server_ns, lambda: socket.create_server((host, 0)))
        threading.Thread(target=_echo_server, args=(listener,), daemon=True).start()
        with listener, open_link(backend, PROFILE, listener.getsockname()[:2], pair) as link:
            ahost, aport = link.address.rsplit(":", 1)
            conn = _in_thread(link.netns, lambda: socket.create_connection((ahost, int(aport))))
            with conn:
                conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                _exchange(conn, 512)  # connection set up and warm
                rows = [_measure_size(conn, link, size, repeats, idle_s) for size in SIZES]
    finally:
        if pair is not None:
            pair.destroy()
    for row in rows:
        row["backend"] = backend
    return rows


def _measure_size(
    conn: socket.socket, link: Any, size: int, repeats: int, idle_s: float
) -> dict[str, Any]:
    times, ups, bound_ups, bound_downs = [], [], [], []
    for _ in range(repeats):
        time.sleep(idle_s)  # start each exchange on an idle link
        before = link.stats()
        times.append(_exchange(conn, size))
        time.sleep(0.01)  # let the last ACKs be counted
        after = link.stats()
        ups.append(after["link_up"] - before["link_up"])
        bound_ups.append(after["bound_up"] - before["bound_up"])
        bound_downs.append(after["bound_down"] - before["bound_down"])
    theory = bound_ms(PROFILE, size, 1)
    # Data-carrying frames only: the receiver's pure ACKs cross the other, idle direction.
    link_theory = bound_ms(PROFILE, statistics.median(bound_ups), statistics.median(bound_downs))
    measured = statistics.median(times)
    return {
        "message_B": size,
        "theory_ms": theory,
        "link_B_up": statistics.median(ups),
        "link_theory_ms": link_theory,
        "measured_ms": measured,
        "error_pct": 100 * (measured - theory) / theory,
        "vs_link_theory_pct": 100 * (measured - link_theory) / link_theory,
        "ok": abs(measured - theory) <= TOLERANCE * theory,
    }
