"""Link profiles and link emulators that make a local connection behave like GPRS ... satellite.

Backends implement `LinkEmulator` (deploy.link.kernel.open_link builds one):
- `netem`: edge and server network namespaces joined by a veth, netem on both ends;
- `tbf`: the same namespaces, tbf for the rate (its bucket kept empty by a filler flow,
  see tc.py) and LinkProxy(shape_rate=False) in the path for delay and jitter;
- `proxy`: LinkProxy alone (no root needed).
choose_backend() picks netem > tbf > proxy and says why; the choice is always reported.
"""

from __future__ import annotations

from typing import Any, Protocol

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
    netns: str | None  # network namespace clients must run in to dial `address`

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

    def stats(self) -> dict[str, Any]:
        """Cumulative counters; link_up/link_down are the bytes the shaper meters."""
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
