"""Link profiles and link emulators that make a local connection behave like GPRS ... satellite.

Backends implement `LinkEmulator`; today there is the userspace `proxy` backend
(LinkProxy). Kernel backends (`tbf`, `netem` between network namespaces) plug in
beside it and may reuse LinkProxy(shape_rate=False) for delay and jitter.
"""

from __future__ import annotations

from typing import Protocol

from deploy.link.profiles import (
    DEFAULT_PROFILES,
    LinkProfile,
    bound_ms,
    get_profile,
    load_profiles,
)
from deploy.link.proxy import LinkProxy


class LinkEmulator(Protocol):
    """What measurement code needs from any link backend."""

    backend: str  # "proxy", "tbf", "netem": always reported next to results
    profile: LinkProfile

    @property
    def address(self) -> str:
        """HOST:PORT that clients dial to reach the upstream through the link."""
        ...

    def start(self) -> LinkEmulator:
        """Bring the link up; returns self."""
        ...

    def close(self) -> None:
        """Tear the link down, leaving nothing behind."""
        ...

    def stats(self) -> dict[str, int]:
        """Cumulative bytes_up, bytes_down and connections."""
        ...


__all__ = [
    "DEFAULT_PROFILES",
    "LinkEmulator",
    "LinkProfile",
    "LinkProxy",
    "bound_ms",
    "get_profile",
    "load_profiles",
]
