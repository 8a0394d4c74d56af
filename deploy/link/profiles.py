"""Link profiles (rate, one-way delay, jitter, queue) loaded from TOML, and the analytic bound."""

from __future__ import annotations

import math
from dataclasses import dataclass, fields
from pathlib import Path

try:  # Python 3.11+
    import tomllib
except ModuleNotFoundError:  # pragma: no cover - Python 3.10
    import tomli as tomllib  # type: ignore[no-redef]

from splitedge.errors import SplitedgeError

DEFAULT_PROFILES = Path(__file__).resolve().parents[1] / "links.toml"
PACKET_BYTES = 1500  # one Ethernet-sized packet: the emulators' unit of serialisation
DEFAULT_QUEUE_BYTES = 64 * 1024
MIN_MTU, MAX_MTU = 576, 9000  # IPv4's guaranteed minimum; jumbo frames
ETHERNET_HEADER = 14


@dataclass(frozen=True)
class LinkProfile:
    """One emulated link; rates in kbit/s (1000 bit), delays in ms, one-way."""

    name: str
    up_kbit: float  # device -> server
    down_kbit: float  # server -> device
    delay_ms: float  # one-way propagation delay; RTT = 2 * delay_ms
    jitter_ms: float = 0.0  # per-packet uniform jitter in [-jitter_ms, +jitter_ms]
    queue_bytes: int = DEFAULT_QUEUE_BYTES  # per-direction queue before the serial link
    source: str = ""  # where the numbers come from
    max_payload_bytes: int = 0  # largest frame the link carries (0: no limit; IP fragments it)
    duty_cycle: float = 1.0  # fraction of time a sender may transmit (regulatory, e.g. LoRa)
    loss_pct: float = 0.0  # random packet loss in each direction, percent (independent per packet)
    burst_bytes: int = 0  # token-bucket depth (tc tbf's burst); 0: strict, every packet waits
    mtu: int = PACKET_BYTES  # largest IP packet on the link (the veth's MTU on kernel backends)
    up_trace: str = ""  # rate-over-time trace for the uplink (Mahimahi or CSV; link/trace.py)
    down_trace: str = ""  # up_kbit/down_kbit then default to the trace's mean (for the bound)
    # TCP's minimum retransmission timeout on both ends' routes (`ip route ... rto_min`), ms;
    # 0 keeps the kernel's 200 ms. A tail-cutting measure under loss (docs/results/loss.md).
    tcp_rto_min_ms: float = 0.0

    def __post_init__(self) -> None:
        if not self.name or not isinstance(self.name, str):
            raise ValueError(f"link profile needs a name, got {self.name!r}")
        for key in ("up_kbit", "down_kbit"):
            value = getattr(self, key)
            if not _is_number(value) or not math.isfinite(value) or value <= 0:
                raise ValueError(
                    f"link {self.name!r}: {key} must be a finite rate > 0, got {value!r}"
                )
        for key in ("delay_ms", "jitter_ms"):
            value = getattr(self, key)
            if not _is_number(value) or not math.isfinite(value) or value < 0:
                raise ValueError(
                    f"link {self.name!r}: {key} must be finite and >= 0, got {value!r}"
                )
        if self.jitter_ms > self.delay_ms:
            # Symmetric jitter larger than the delay would deliver packets before they were sent.
            raise ValueError(
                f"link {self.name!r}: jitter_ms ({self.jitter_ms}) must not exceed delay_ms ({self.delay_ms})"
            )
        if not isinstance(self.queue_bytes, int) or isinstance(self.queue_bytes, bool):
            raise ValueError(
                f"link {self.name!r}: queue_bytes must be an integer, got {self.queue_bytes!r}"
            )
        if self.queue_bytes < PACKET_BYTES:
            raise ValueError(
                f"link {self.name!r}: queue_bytes must hold at least one {PACKET_BYTES}-byte packet, "
                f"got {self.queue_bytes}"
            )
        if not isinstance(self.max_payload_bytes, int) or self.max_payload_bytes < 0:
            raise ValueError(
                f"link {self.name!r}: max_payload_bytes must be an integer >= 0, "
                f"got {self.max_payload_bytes!r}"
            )
        if not _is_number(self.duty_cycle) or not 0 < self.duty_cycle <= 1:
            raise ValueError(
                f"link {self.name!r}: duty_cycle must be in (0, 1], got {self.duty_cycle!r}"
            )
        if not _is_number(self.loss_pct) or not 0 <= self.loss_pct <= 100:
            raise ValueError(
                f"link {self.name!r}: loss_pct must be a percentage in [0, 100], got {self.loss_pct!r}"
            )
        if not _is_int(self.mtu) or not MIN_MTU <= self.mtu <= MAX_MTU:
            raise ValueError(
                f"link {self.name!r}: mtu must be an integer in [{MIN_MTU}, {MAX_MTU}], "
                f"got {self.mtu!r}"
            )
        if not _is_int(self.burst_bytes) or (
            self.burst_bytes and self.burst_bytes < self.mtu + ETHERNET_HEADER
        ):
            raise ValueError(
                f"link {self.name!r}: burst_bytes must be 0 (strict) or hold one frame "
                f"(>= mtu + {ETHERNET_HEADER} = {self.mtu + ETHERNET_HEADER}), got {self.burst_bytes!r}"
            )
        if not _is_number(self.tcp_rto_min_ms) or not (
            self.tcp_rto_min_ms == 0 or 1 <= self.tcp_rto_min_ms <= 60_000
        ):
            raise ValueError(
                f"link {self.name!r}: tcp_rto_min_ms must be 0 (kernel default) or in "
                f"[1, 60000], got {self.tcp_rto_min_ms!r}"
            )
        if not isinstance(self.source, str):
            raise ValueError(f"link {self.name!r}: source must be a string, got {self.source!r}")

    @property
    def rtt_ms(self) -> float:
        """Round-trip propagation delay without serialisation."""
        return 2.0 * self.delay_ms


_REQUIRED = ("up_kbit", "down_kbit", "delay_ms")


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def bound_ms(profile: LinkProfile, bytes_up: float, bytes_down: float) -> float:
    """Analytic floor of one request/reply exchange: round-trip delay + serialisation both ways."""
    # kbit/s is bit/ms, so bytes * 8 / kbit is milliseconds.
    return profile.rtt_ms + bytes_up * 8 / profile.up_kbit + bytes_down * 8 / profile.down_kbit


TCP_GRPC_OVERHEAD = 14 + 20 + 32 + 9 + 5  # Ethernet, IPv4, TCP+timestamps, HTTP/2 DATA, gRPC


def refusal(profile: LinkProfile, message_bytes: int) -> str:
    """Why a closed loop sending message_bytes per step cannot run over profile ('' if it can)."""
    need = message_bytes + TCP_GRPC_OVERHEAD
    problems = []
    if profile.max_payload_bytes and need > profile.max_payload_bytes:
        problems.append(
            f"one request needs >= {need} B ({message_bytes} B message + {TCP_GRPC_OVERHEAD} B "
            f"TCP/IP/HTTP2/gRPC headers) but a frame carries at most {profile.max_payload_bytes} B"
        )
    if profile.duty_cycle < 1:
        frame = profile.max_payload_bytes or need
        air_s = frame * 8 / (profile.up_kbit * 1000)
        wait_s = air_s / profile.duty_cycle - air_s
        problems.append(
            f"a {profile.duty_cycle:.0%} duty cycle allows one {frame} B frame ({air_s * 1e3:.0f} ms "
            f"on air) per {wait_s + air_s:.1f} s, so at most {profile.duty_cycle / air_s:.3f} "
            "decisions/s where control needs one every step"
        )
    if not problems:
        return ""
    return f"link '{profile.name}' cannot carry a feature tensor per step: " + "; ".join(problems)


def load_profiles(path: str | Path | None = None) -> dict[str, LinkProfile]:
    """Profiles from a TOML file (one table per profile); the shipped deploy/links.toml by default."""
    path = Path(path) if path is not None else DEFAULT_PROFILES
    try:
        with path.open("rb") as f:
            doc = tomllib.load(f)
    except FileNotFoundError:
        raise SplitedgeError(
            f"link profile file {path} not found; pass an existing TOML file"
        ) from None
    except (OSError, tomllib.TOMLDecodeError) as e:
        raise SplitedgeError(f"cannot read link profiles from {path}: {e}; fix the TOML") from None
    known = {f.name for f in fields(LinkProfile)} - {"name"}
    profiles: dict[str, LinkProfile] = {}
    for name, table in doc.items():
        if not isinstance(table, dict):
            raise SplitedgeError(
                f"{path}: '{name}' must be a [table] of link settings, got {table!r}"
            )
        unknown = sorted(set(table) - known)
        if unknown:
            raise SplitedgeError(
                f"{path}: profile '{name}' has unknown keys {unknown}; allowed: {sorted(known)}"
            )
        table = _with_traces(path, name, dict(table))
        missing = sorted(set(_REQUIRED) - set(table))
        if missing:
            raise SplitedgeError(f"{path}: profile '{name}' lacks {missing}; add them")
        try:
            profiles[name] = LinkProfile(name=name, **table)
        except ValueError as e:
            raise SplitedgeError(f"{path}: {e}") from None
    return profiles


def _with_traces(path: Path, name: str, table: dict[str, object]) -> dict[str, object]:
    """Resolve up_trace/down_trace against the links file's folder, check them, and default
    the direction's rate to the trace's mean."""
    from deploy.link.trace import load_trace

    for direction in ("up", "down"):
        value = table.get(f"{direction}_trace")
        if value is None:
            continue
        if not isinstance(value, str) or not value:
            raise SplitedgeError(f"{path}: profile '{name}': {direction}_trace must be a file path")
        trace_path = (path.parent / value).resolve()
        trace = load_trace(trace_path)
        table[f"{direction}_trace"] = str(trace_path)
        table.setdefault(f"{direction}_kbit", round(trace.mean_kbit, 1))
    return table


def get_profile(name: str, path: str | Path | None = None) -> LinkProfile:
    """The profile called name (case-insensitive), or a SplitedgeError listing the known ones."""
    profiles = load_profiles(path)
    for key in (name, name.strip().lower()):
        if key in profiles:
            return profiles[key]
    raise SplitedgeError(f"unknown link profile '{name}'; known: {', '.join(sorted(profiles))}")
