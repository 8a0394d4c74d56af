"""Bundles made for tests from the shipped one."""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path

from splitedge.bundle import write_manifest
from tests.conftest import ZOO_BUNDLE


def reversioned(tmp: Path, version: str, padding_kb: int = 0) -> Path:
    """The shipped bundle under another version (and optionally padded so a transfer takes a
    while), unsigned, in tmp/<version>."""
    out = tmp / version
    shutil.copytree(ZOO_BUNDLE, out)
    manifest = json.loads((out / "manifest.json").read_text())
    manifest.pop("format")
    manifest.pop("files")
    manifest["version"] = version
    if padding_kb:
        (out / "padding.bin").write_bytes(random.Random(0).randbytes(padding_kb * 1024))
    write_manifest(out, manifest)
    return out
