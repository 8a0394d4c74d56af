"""`splitedge export`: trained SB3 model -> policy bundle."""

from __future__ import annotations

import argparse
from pathlib import Path

from splitedge.errors import SplitedgeError
from splitedge.output import emit, table


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "export",
        help="export a trained model to a policy bundle",
        description="Build a bundle (encoder IR + weights, encoder/head/full ONNX, "
        "manifest with sha256 of every file) from a run's model.zip.",
    )
    p.add_argument(
        "--model",
        type=Path,
        required=True,
        help="SB3 model.zip of a ppo, sac or ddpg run with a miniconv encoder "
        "(result.json beside it is recorded)",
    )
    p.add_argument("--out", type=Path, required=True, help="bundle directory to write")
    p.add_argument(
        "--name", default=None, help="bundle name (default: the output directory's name)"
    )
    p.add_argument("--version", default="1.0.0", help="bundle version (default: %(default)s)")
    p.add_argument("--json", action="store_true", help="print the manifest as JSON")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    if not args.model.is_file():
        raise SplitedgeError(
            f"model {args.model} not found; train one with `splitedge train --out DIR`"
        )
    try:
        from models.export import export_policy
    except ImportError as e:
        raise SplitedgeError(
            f"export needs the train extra ({e}); run `pip install -e .[train]`"
        ) from e
    manifest = export_policy(args.model, args.out, args.name or args.out.name, args.version)
    rows = [
        {"file": k, "bytes": (args.out / k).stat().st_size, "sha256": v[:16]}
        for k, v in manifest["files"].items()
    ]
    emit(
        manifest,
        args.json,
        table(rows, title=f"bundle {manifest['name']} {manifest['version']} -> {args.out}"),
    )
    return 0
