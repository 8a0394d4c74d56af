"""docs/client.md, generated from the device client's docstrings:
`python -m edge.client_docs > docs/client.md` (a test checks it is current)."""

from __future__ import annotations

import dataclasses
import inspect
from typing import Any

from edge.channel import ChannelSecurity
from edge.client import ClientConfig, PolicyClient, connect


def options_reference() -> str:
    """docs/client.md: connect(), PolicyClient and ClientConfig as their docstrings say."""
    parts = [
        "# Device client reference\n",
        "Generated from the docstrings of `edge/client.py` and `edge/channel.py` by "
        "`python -m edge.client_docs > docs/client.md`; do not edit by hand.\n",
    ]
    for obj in (connect, PolicyClient.connect, PolicyClient.act, PolicyClient.send,
                PolicyClient.poll, PolicyClient, ClientConfig, ChannelSecurity):  # fmt: skip
        parts.append(
            f"## `{obj.__qualname__}{_signature(obj)}`\n\n```text\n{inspect.getdoc(obj)}\n```\n"
        )
    return "\n".join(parts)


def _signature(obj: Any) -> str:
    if not dataclasses.is_dataclass(obj):
        return str(inspect.signature(obj))
    shown = []
    for f in dataclasses.fields(obj):
        if f.name.startswith("_"):
            continue
        shown.append(f.name if f.default is dataclasses.MISSING else f"{f.name}={f.default!r}")
    return f"({', '.join(shown)})"


if __name__ == "__main__":
    print(options_reference(), end="")
