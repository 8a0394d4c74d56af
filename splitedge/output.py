"""Results are plain data; this prints them as a human table or as JSON."""

from __future__ import annotations

import json
import sys
from collections.abc import Sequence
from typing import Any


def table(
    rows: Sequence[dict[str, Any]], columns: Sequence[str] | None = None, title: str = ""
) -> str:
    """A fixed-width text table of dict rows (columns default to the first row's keys)."""
    if not rows:
        return f"{title}\n(no rows)" if title else "(no rows)"
    cols = list(columns or rows[0].keys())
    cells = [[_fmt(r.get(c, "")) for c in cols] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(cols)]
    lines = [title] if title else []
    lines.append("  ".join(c.ljust(w) for c, w in zip(cols, widths, strict=True)))
    lines.append("  ".join("-" * w for w in widths))
    for row in cells:
        lines.append(
            "  ".join(
                v.rjust(w) if _numeric(v) else v.ljust(w) for v, w in zip(row, widths, strict=True)
            )
        )
    return "\n".join(lines)


def _numeric(s: str) -> bool:
    try:
        float(s.rstrip("x%"))
        return True
    except ValueError:
        return False


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.3g}" if abs(v) < 0.01 and v != 0 else f"{v:,.2f}".replace(",", "")
    return str(v)


def emit(result: Any, as_json: bool, text: str | None = None) -> None:
    """Print a command's result: JSON when asked, else its text rendering."""
    if as_json:
        json.dump(result, sys.stdout, indent=2, default=str)
        sys.stdout.write("\n")
    else:
        print(text if text is not None else json.dumps(result, indent=2, default=str))
    sys.stdout.flush()  # a command that keeps running (device emulate) is read while it runs
