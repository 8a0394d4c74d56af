"""`splitedge bundle verify|build`: check bundles against their manifests."""

from __future__ import annotations

import argparse
from pathlib import Path

from splitedge.bundle import read_manifest, load_bundle, verify_files
from splitedge.errors import SplitedgeError
from splitedge.output import emit


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("bundle", help="verify (and later sign) bundles")
    bsub = p.add_subparsers(dest="bundle_command", metavar="ACTION", required=True)
    v = bsub.add_parser("verify", help="check every file's sha256 against the manifest",
                        description="Exit 0 if every file matches its manifest sha256; otherwise "
                        "name each file that does not match and exit 1.")
    v.add_argument("bundle", type=Path, help="bundle directory or .tar")
    v.add_argument("--json", action="store_true")
    v.set_defaults(func=verify)


def verify(args: argparse.Namespace) -> int:
    bundle = load_bundle(args.bundle, verify=False)
    problems = verify_files(bundle.root, read_manifest(bundle.root))
    result = {"bundle": str(args.bundle), "name": bundle.name, "version": bundle.version,
              "files": len(bundle.manifest.get("files", {})), "ok": not problems, "problems": problems}
    if problems:
        text = f"{args.bundle}: FAILED\n" + "\n".join(f"  {p}" for p in problems)
    else:
        text = f"{args.bundle}: OK ({result['files']} files match, {bundle.name} {bundle.version})"
    emit(result, args.json, text)
    if problems:
        raise SplitedgeError(f"{len(problems)} file(s) do not match the manifest", exit_code=1)
    return 0
