"""Finished cells of a `measure` sweep, kept on disk as each one completes.

OUT/cells.jsonl holds one JSON line per finished cell (its row, per-step latencies and the
fingerprint of what produced it: bundle, steps, link backend, the link profile's numbers).
A line is flushed and fsynced before the next cell starts, so Ctrl-C, a crash or a lost
machine keeps every cell already measured. A rerun of the same command reuses the cells
whose fingerprint still matches and measures only the missing ones; a cell measured under
other settings is measured again, never mixed in. The file is removed once the complete
results are written, so rerunning a finished command measures afresh.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from splitedge.errors import SplitedgeError

FILE = "cells.jsonl"


@dataclass
class StoredCell:
    """A cell measured earlier (or just now), as plain data: what results.json needs of it."""

    link: str
    mode: str
    clients: int
    encoder: str
    row_data: dict[str, Any]
    latencies_ms: list[float] = field(default_factory=list)

    def row(self) -> dict[str, Any]:
        return dict(self.row_data)

    def latencies(self) -> list[float]:
        return list(self.latencies_ms)


def check_writable(out: Path) -> None:
    """Refuse an --out that cannot take results, before anything is measured."""
    if out.exists() and not out.is_dir():
        raise SplitedgeError(f"--out {out} is a file, not a directory; pass a directory")
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / ".splitedge-write-check"
        probe.write_text("ok")
        probe.unlink()
    except OSError as e:
        raise SplitedgeError(
            f"--out {out} is not writable ({e.strerror or e}); pass a directory you can write to"
        ) from None


class CellStore:
    """OUT/cells.jsonl: append a finished cell, look up one measured before."""

    def __init__(self, out: Path, resume: bool = True) -> None:
        self.out = Path(out)
        self.path = self.out / FILE
        self.resume = resume
        self.previous: dict[str, dict[str, Any]] = {}  # key -> stored line
        self.done: list[StoredCell] = []  # finished this run or resumed, in sweep order
        self.resumed = 0
        self.sweep: Any = None  # the Sweep being filled, for a partial write on interrupt

    def open(self) -> None:
        """Check --out is writable and read the cells a previous run left (if resuming)."""
        check_writable(self.out)
        if self.resume and self.path.exists():
            for line in self.path.read_text().splitlines():
                try:
                    entry = json.loads(line)
                    self.previous[entry["key"]] = entry
                except (ValueError, KeyError, TypeError):
                    continue  # a line cut short by a crash: that cell is measured again
        keep = list(self.previous.values())
        with self.path.open("w") as f:  # rewrite: drop torn lines, keep whole ones
            for entry in keep:
                f.write(json.dumps(entry) + "\n")

    def lookup(self, key: str, fingerprint: dict[str, Any]) -> StoredCell | None:
        """The cell stored under key if it was measured with the same fingerprint."""
        entry = self.previous.get(key)
        if entry is None or entry.get("fingerprint") != _plain(fingerprint):
            return None
        cell = _from_entry(entry)
        self.done.append(cell)
        self.resumed += 1
        return cell

    def add(self, key: str, fingerprint: dict[str, Any], cell: Any) -> None:
        """Append a finished cell and push it to disk before the next one starts."""
        entry = {
            "key": key, "fingerprint": _plain(fingerprint), "link": cell.link, "mode": cell.mode,
            "clients": cell.clients, "encoder": cell.encoder, "row": cell.row(),
            "latencies_ms": cell.latencies(),
        }  # fmt: skip
        with self.path.open("a") as f:
            f.write(json.dumps(entry) + "\n")
            f.flush()
            os.fsync(f.fileno())
        self.previous[key] = entry
        self.done.append(_from_entry(entry))

    def finish(self) -> None:
        """The complete results are written: nothing left to resume."""
        self.path.unlink(missing_ok=True)


def _from_entry(entry: dict[str, Any]) -> StoredCell:
    return StoredCell(
        entry["link"], entry["mode"], int(entry["clients"]), entry.get("encoder", ""),
        entry["row"], entry.get("latencies_ms", []),
    )  # fmt: skip


def _plain(value: Any) -> Any:
    """value as JSON would give it back (tuples as lists), so fingerprints compare equal."""
    return json.loads(json.dumps(value, default=str))
