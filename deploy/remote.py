"""`measure --server HOST:PORT`: decision latency against a real running server, no emulation.

Before anything is measured the server is checked as an edge device would: connect and
Hello with the bundle (an unreachable server, refused credentials or a bundle the server
does not serve are one line each). The round trip the bound charges is measured, not
assumed: the median of TCP connect times to HOST:PORT (one SYN/SYN-ACK each, no payload).
Link rates are the user's (--server-up-kbit/--server-down-kbit); without them serialisation
is not charged. A counting-only proxy on loopback (no delay, no rate) reads the bytes that
cross, as on the netem backend. TLS and tokens come from the edge client's SPLITEDGE_CA /
SPLITEDGE_CERT / SPLITEDGE_KEY / SPLITEDGE_TOKEN_FILE / SPLITEDGE_TLS_NAME variables.
"""

from __future__ import annotations

import contextlib
import socket
import statistics
import time
from collections.abc import Iterator
from pathlib import Path

from deploy.link.profiles import LinkProfile
from splitedge.errors import SplitedgeError

UNCHARGED_KBIT = 1e9  # a rate whose serialisation is ~0: used when the user gives none
PROBES = 9


class RemoteServer:
    """A server we did not start: its address; its CPU is not ours to read (0)."""

    def __init__(self, address: str) -> None:
        self.address = address

    def cpu_seconds(self) -> float:
        return 0.0


def split_address(server: str) -> tuple[str, int]:
    """HOST:PORT -> (host, port), or a one-line error."""
    host, _, port = server.rpartition(":")
    if not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise SplitedgeError(f"--server takes HOST:PORT, e.g. 10.0.0.5:50051; got {server!r}")
    return host.strip("[]"), int(port)


def check_server(bundle: Path, server: str, mode: str, wait_s: float = 5.0) -> None:
    """Connect and Hello as an edge device would; one line if unreachable or refused."""
    from edge.client import ClientConfig, PolicyClient, Unauthenticated
    from splitedge.bundle import load_bundle

    client = PolicyClient(load_bundle(bundle), ClientConfig(server=server, mode=mode))
    try:
        client.connect(wait_s=wait_s)
    except Unauthenticated as e:
        raise SplitedgeError(f"server {server} refused this device's credentials: {e}") from None
    except ConnectionError as e:
        raise SplitedgeError(
            f"cannot reach a policy server at {server} within {wait_s:g} s ({e}); "
            "start one with `splitedge serve` or check the address"
        ) from None
    finally:
        client.close()


def measured_rtt_ms(server: str, probes: int = PROBES) -> float:
    """Median TCP connect time to server, in ms."""
    host, port = split_address(server)
    times = []
    for _ in range(probes):
        t0 = time.perf_counter()
        try:
            with socket.create_connection((host, port), timeout=5.0):
                times.append(1e3 * (time.perf_counter() - t0))
        except OSError as e:
            raise SplitedgeError(f"cannot reach {server}: {e}") from None
    return statistics.median(times)


def remote_profile(
    server: str, rtt_ms: float, up_kbit: float | None, down_kbit: float | None
) -> LinkProfile:
    """The measured path as a profile: half the RTT each way, the user's rates or none charged."""
    return LinkProfile(
        name="remote",
        up_kbit=up_kbit or UNCHARGED_KBIT,
        down_kbit=down_kbit or UNCHARGED_KBIT,
        delay_ms=rtt_ms / 2,
        source=f"measured against {server}: median TCP connect RTT {rtt_ms:.3f} ms"
        + ("" if up_kbit and down_kbit else "; link rates not given, serialisation not charged"),
    )


@contextlib.contextmanager
def remote(server: str) -> Iterator[tuple[RemoteServer, None]]:
    """shaped_server's counterpart: nothing to start."""
    yield RemoteServer(server), None
