"""A policy bundle's real-time fields: how its head hides link latency (issue 17).

manifest.json's `policy.realtime`, written by export and read by the server and the device:

    {"format": "splitedge-realtime/1", "chunk_length": H, "action_history": D,
     "control_hz": hz, "strategy": "hold" | "delay-aware" | "chunk"}

    format "splitedge-realtime/2" adds "history_source": "device" | "server"

- chunk_length H >= 1: head.onnx answers one observation with the next H actions, for
  its tick onwards; its output is (B, H, *action shape) when H > 1, (B, *action shape) at 1.
- action_history D >= 0: head.onnx has a second input `actions_in_flight`,
  (B, D, *action shape) in the action dtype, the last D actions chosen before the
  observation (edge/history.py says which the device sends); none at 0.
- history_source (D > 0): who supplies those actions. "device": the device sends what it
  knows of them (format /1 bundles are all "device"). "server": the actions the server
  chose, which it keeps per stream (server/stream_history.py); over a slow link only the
  server knows the replies still on their way down. A device that knows them all (the
  turn-by-turn loop) may still send them. Written as format /2, so a splitedge that
  predates it refuses the bundle in one line instead of feeding its head the wrong history.
- control_hz: the control rate the policy was trained at (None: not trained for one).

A bundle without the section (every bundle before issue 17 part 2) is H = 1, D = 0. The
section is validated when read (types, ranges, its format tag), and the server checks it
against the ONNX head's inputs and outputs (server/models.py).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from splitedge.errors import SplitedgeError

FORMAT = "splitedge-realtime/1"
FORMAT_V2 = "splitedge-realtime/2"  # adds history_source
FORMATS = (FORMAT, FORMAT_V2)
HISTORY_SOURCES = ("device", "server")
MAX_CHUNK = 256  # longer plans are not what chunking is for, and bound the reply's size
MAX_HISTORY = 256
STRATEGIES = ("hold", "delay-aware", "chunk")


@dataclass(frozen=True)
class RealtimeSpec:
    """How a bundle's head hides latency; `RealtimeSpec()` is a plain (pre-issue-17) head."""

    chunk_length: int = 1
    action_history: int = 0
    control_hz: float | None = None
    history_source: str = "device"

    def __post_init__(self) -> None:
        problems = _problems(
            self.chunk_length, self.action_history, self.control_hz, self.history_source
        )
        if problems:
            raise ValueError("; ".join(problems))

    @property
    def strategy(self) -> str:
        """'chunk' (H > 1), 'delay-aware' (D > 0), or 'hold' (a plain head: hold the newest)."""
        if self.chunk_length > 1:
            return "chunk"
        return "delay-aware" if self.action_history > 0 else "hold"

    def describe(self) -> str:
        """e.g. 'chunk 8', 'delay-aware (history 7)', 'hold'."""
        if self.strategy == "chunk":
            return f"chunk {self.chunk_length}"
        if self.strategy == "delay-aware":
            where = ", server-kept" if self.server_history else ""
            return f"delay-aware (history {self.action_history}{where})"
        return "hold"

    @property
    def server_history(self) -> bool:
        """The server supplies the actions in flight (a delay-aware head, history_source server)."""
        return self.action_history > 0 and self.history_source == "server"

    def to_manifest(self) -> dict[str, Any]:
        """The manifest's `policy.realtime` section (format /2 only when it needs it)."""
        section: dict[str, Any] = {
            "format": FORMAT_V2 if self.server_history else FORMAT,
            "chunk_length": self.chunk_length,
            "action_history": self.action_history,
            "control_hz": self.control_hz,
            "strategy": self.strategy,
        }
        if self.server_history:
            section["history_source"] = self.history_source
        return section


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _problems(chunk: Any, history: Any, hz: Any, source: Any = "device") -> list[str]:
    out = []
    if not _is_int(chunk) or not 1 <= chunk <= MAX_CHUNK:
        out.append(f"chunk_length must be an integer in [1, {MAX_CHUNK}], got {chunk!r}")
    if not _is_int(history) or not 0 <= history <= MAX_HISTORY:
        out.append(f"action_history must be an integer in [0, {MAX_HISTORY}], got {history!r}")
    number = isinstance(hz, (int, float)) and not isinstance(hz, bool)
    if hz is not None and not (number and math.isfinite(hz) and hz > 0):
        out.append(f"control_hz must be a number > 0 or null, got {hz!r}")
    if source not in HISTORY_SOURCES:
        out.append(f"history_source must be one of {HISTORY_SOURCES}, got {source!r}")
    return out


def realtime_spec(policy: dict[str, Any], where: str = "bundle") -> RealtimeSpec:
    """The bundle's RealtimeSpec from its manifest policy section; one-line SplitedgeError
    when the section is malformed. No section: a plain head (chunk 1, history 0)."""
    section = policy.get("realtime")
    if section is None:
        return RealtimeSpec()
    if not isinstance(section, dict):
        raise SplitedgeError(
            f"{where}: policy.realtime must be an object, got {type(section).__name__}; "
            "re-export the bundle"
        )
    fmt = section.get("format")
    if fmt not in FORMATS:
        raise SplitedgeError(
            f"{where}: policy.realtime format is {fmt!r}, this splitedge "
            f"reads {' or '.join(repr(f) for f in FORMATS)}; re-export the bundle or update "
            "splitedge"
        )
    chunk, history = section.get("chunk_length", 1), section.get("action_history", 0)
    hz = section.get("control_hz")
    if fmt == FORMAT and "history_source" in section:
        raise SplitedgeError(f"{where}: policy.realtime: history_source needs format {FORMAT_V2!r}")
    source = section.get("history_source", "device")
    problems = _problems(chunk, history, hz, source)
    if fmt == FORMAT_V2 and not (source == "server" and _is_int(history) and history > 0):
        problems.append(
            f"format {FORMAT_V2!r} is for history_source 'server' with action_history > 0"
        )
    if problems:
        raise SplitedgeError(f"{where}: policy.realtime: {'; '.join(problems)}; re-export it")
    spec = RealtimeSpec(chunk, history, None if hz is None else float(hz), source)
    if "strategy" in section and section["strategy"] != spec.strategy:
        raise SplitedgeError(
            f"{where}: policy.realtime strategy {section['strategy']!r} does not match "
            f"chunk_length {chunk} and action_history {history} ({spec.strategy!r}); re-export it"
        )
    return spec
