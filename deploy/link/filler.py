"""The tbf backend's filler: keeps a token bucket empty so every real packet pays its own time.

`python -m deploy.link.filler NS:DEST_IP:FRAME_BYTES [...]`: one thread per spec enters
network namespace NS and sends FRAME_BYTES-sized UDP frames to DEST_IP (a blackholed
address across the link) at the lowest pfifo_fast priority, as fast as the shaper lets
them go. The send buffer is the brake: a send blocks until earlier frames have left the
qdisc, so the process uses CPU in proportion to the link's rate, never spins.
See deploy/link/tc.py for why this is needed.
"""

from __future__ import annotations

import signal
import socket
import sys
import threading

from deploy.link.netns import die_with_parent, enter, raise_priority
from deploy.link.tc import ETHERNET_HEADER, FILLER_PRIORITY

_IP_UDP_HEADERS = 28
_DISCARD_PORT = 9
_SNDBUF = 64 * 1024  # the kernel doubles it; ~80 small frames


def fill(ns: str, dest: str, frame_bytes: int, stop: threading.Event) -> None:
    """Send filler frames from namespace ns to dest until stop is set."""
    enter(ns)
    payload = b"\0" * max(0, frame_bytes - ETHERNET_HEADER - _IP_UDP_HEADERS)
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_PRIORITY, FILLER_PRIORITY)
        # Room for tens of queued frames: they wait in the lowest band, never ahead of real
        # traffic, and keep the bucket drained through a few ms in which we get no CPU.
        s.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, _SNDBUF)
        s.settimeout(0.5)  # so a stop request is noticed even on a stalled link
        while not stop.is_set():
            try:
                s.sendto(payload, (dest, _DISCARD_PORT))
            except (TimeoutError, BlockingIOError):
                continue
            except OSError:  # ENOBUFS when the qdisc is full: let it drain
                stop.wait(0.001)


def main(argv: list[str] | None = None) -> int:
    """Start one filler thread per NS:DEST:BYTES spec; run until SIGTERM/SIGINT or stdin closes."""
    die_with_parent()
    raise_priority()  # a starved filler would let tokens pile up again
    specs = [a.split(":") for a in (sys.argv[1:] if argv is None else argv)]
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's to handle
    threads = [
        threading.Thread(target=fill, args=(ns, dest, int(n), stop), daemon=True)
        for ns, dest, n in specs
    ]
    for t in threads:
        t.start()
    print("filling", flush=True)

    # The parent closes our stdin to stop us; reading it also notices the parent dying.
    def watch_stdin() -> None:
        sys.stdin.read()
        stop.set()

    threading.Thread(target=watch_stdin, daemon=True).start()
    while not stop.wait(0.5):
        pass
    return 0


if __name__ == "__main__":
    sys.exit(main())
