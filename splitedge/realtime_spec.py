"""A policy bundle's real-time fields: how its head hides link latency (issue 17).

manifest.json's `policy.realtime`, written by export and read by the server and the device:

    {"format": "splitedge-realtime/1", "chunk_length": H, "action_history": D,
     "control_hz": hz, "strategy": "hold" | "delay-aware" | "chunk"}

- chunk_length H >= 1: head.onnx answers one observation with the next H actions, for
  its tick onwards; its output is (B, H, *action shape) when H > 1, (B, *action shape) at 1.
- action_history D >= 0: head.onnx has a second input `actions_in_flight`,
  (B, D, *action shape) in the action dtype, the last D actions chosen before the
  observation (edge/history.py says which the device sends); none at 0.
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
MAX_CHUNK = 256  # longer plans are not what chunking is for, and bound the reply's size
MAX_HISTORY = 256
STRATEGIES = ("hold", "delay-aware", "chunk")


@dataclass(frozen=True)
class RealtimeSpec:
    """How a bundle's head hides latency; `RealtimeSpec()` is a plain (pre-issue-17) head."""

    chunk_length: int = 1
    action_history: int = 0
    control_hz: float | None = None

    def __post_init__(self) -> None:
        problems = _problems(self.chunk_length, self.action_history, self.control_hz)
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
            return f"delay-aware (history {self.action_history})"
        return "hold"

    def to_manifest(self) -> dict[str, Any]:
        """The manifest's `policy.realtime` section."""
        return {
            "format": FORMAT,
            "chunk_length": self.chunk_length,
            "action_history": self.action_history,
            "control_hz": self.control_hz,
            "strategy": self.strategy,
        }


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _problems(chunk: Any, history: Any, hz: Any) -> list[str]:
    out = []
    if not _is_int(chunk) or not 1 <= chunk <= MAX_CHUNK:
        out.append(f"chunk_length must be an integer in [1, {MAX_CHUNK}], got {chunk!r}")
    if not _is_int(history) or not 0 <= history <= MAX_HISTORY:
        out.append(f"action_history must be an integer in [0, {MAX_HISTORY}], got {history!r}")
    number = isinstance(hz, (int, float)) and not isinstance(hz, bool)
    if hz is not None and not (number and math.isfinite(hz) and hz > 0):
        out.append(f"control_hz must be a number > 0 or null, got {hz!r}")
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
    if section.get("format") != FORMAT:
        raise SplitedgeError(
            f"{where}: policy.realtime format is {section.get('format')!r}, this splitedge "
            f"reads {FORMAT!r}; re-export the bundle or update splitedge"
        )
    chunk, history = section.get("chunk_length", 1), section.get("action_history", 0)
    hz = section.get("control_hz")
    problems = _problems(chunk, history, hz)
    if problems:
        raise SplitedgeError(f"{where}: policy.realtime: {'; '.join(problems)}; re-export it")
    spec = RealtimeSpec(chunk, history, None if hz is None else float(hz))
    if "strategy" in section and section["strategy"] != spec.strategy:
        raise SplitedgeError(
            f"{where}: policy.realtime strategy {section['strategy']!r} does not match "
            f"chunk_length {chunk} and action_history {history} ({spec.strategy!r}); re-export it"
        )
    return spec
