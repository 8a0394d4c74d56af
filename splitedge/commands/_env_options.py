"""--env / --env-kwargs for the commands that run a policy bundle's closed loop or read its
observations (edge run, measure, bench encoder, soak, flash)."""

from __future__ import annotations

import argparse
import json
from typing import Any

from splitedge.errors import SplitedgeError


def add_env_options(p: argparse.ArgumentParser) -> None:
    """--env and --env-kwargs, as `splitedge export` takes them."""
    p.add_argument(
        "--env",
        default=None,
        metavar="ID_OR_ENTRY_POINT",
        help="the env to run the policy in: a gymnasium id, one of our tasks, or "
        "package.module:ClassName (importable here); default: the env the bundle records, "
        "else its task",
    )
    p.add_argument(
        "--env-kwargs",
        default=None,
        metavar="JSON",
        help="keyword arguments for the env, as a JSON object (e.g. '{\"size\": 48}'); "
        "default: the ones the bundle records for its env",
    )


def env_kwargs(text: str | None) -> dict[str, Any] | None:
    """--env-kwargs parsed: a dict, or None when not given."""
    if text is None:
        return None
    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        raise SplitedgeError(f"--env-kwargs is not JSON ({e}); e.g. '{{\"size\": 48}}'") from e
    if not isinstance(value, dict):
        raise SplitedgeError(f"--env-kwargs must be a JSON object, got {type(value).__name__}")
    return value
