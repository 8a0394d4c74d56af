"""The splitedge CLI: parse, dispatch to a command module, print. Work happens elsewhere.

Each module in splitedge.commands exposes ``register(subparsers)``; it sets
``func`` on its parser(s) to a handler ``(args) -> int``. Components are
imported lazily inside handlers so `splitedge --help` stays fast and the edge
commands never pull in server or training code.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence

from splitedge import __version__
from splitedge.errors import SplitedgeError

# Preferred order in `--help`; any other module in splitedge/commands is listed after these.
COMMAND_ORDER = (
    "demo",
    "train",
    "export",
    "bundle",
    "serve",
    "edge",
    "measure",
    "bench",
    "flash",
    "status",
    "rollback",
    "llm",
)


def _command_modules() -> list[str]:
    import pkgutil

    import splitedge.commands as pkg

    found = {m.name for m in pkgutil.iter_modules(pkg.__path__) if not m.name.startswith("_")}
    return [n for n in COMMAND_ORDER if n in found] + sorted(found - set(COMMAND_ORDER))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="splitedge",
        description="Deploy split RL policies and ROM-backed LLMs to edge devices.",
        epilog="Run `splitedge COMMAND --help` for a command's options. "
        "Start with `splitedge demo`.",
    )
    parser.add_argument("--version", action="version", version=f"splitedge {__version__}")
    parser.add_argument("--verbose", action="store_true", help="show tracebacks on errors")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in _command_modules():
        importlib.import_module(f"splitedge.commands.{name}").register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parser.parse_args(argv)
    args.argv = argv  # so reports can name the exact command that produced them
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except SplitedgeError as e:
        if args.verbose:
            raise
        print(f"splitedge: error: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        print("splitedge: interrupted", file=sys.stderr)
        return 130
