"""Bundle v1: manifest hashes, verification naming bad files, .tar bundles, CLI exit codes."""

from __future__ import annotations

import hashlib
import json
import shutil
import tarfile
from pathlib import Path

import pytest

from splitedge.bundle import FORMAT, load_bundle, verify_files, write_manifest
from splitedge.cli import main
from splitedge.errors import SplitedgeError


def _make(tmp: Path) -> Path:
    root = tmp / "b"
    (root / "sub").mkdir(parents=True)
    (root / "a.bin").write_bytes(b"alpha")
    (root / "sub" / "b.txt").write_text("beta")
    write_manifest(root, {"kind": "policy", "name": "t", "version": "1", "policy": {}})
    return root


def test_manifest_lists_sha256_of_every_file(tmp_path: Path) -> None:
    root = _make(tmp_path)
    m = json.loads((root / "manifest.json").read_text())
    assert m["format"] == FORMAT
    assert m["files"] == {
        "a.bin": hashlib.sha256(b"alpha").hexdigest(),
        "sub/b.txt": hashlib.sha256(b"beta").hexdigest(),
    }


def test_verify_names_changed_missing_and_unlisted_files(tmp_path: Path) -> None:
    root = _make(tmp_path)
    (root / "a.bin").write_bytes(b"tampered")
    (root / "sub" / "b.txt").unlink()
    (root / "extra").write_text("x")
    problems = verify_files(root, json.loads((root / "manifest.json").read_text()))
    assert problems == [
        "a.bin: sha256 does not match the manifest",
        "sub/b.txt: missing",
        "extra: not listed in the manifest",
    ]
    with pytest.raises(SplitedgeError, match="a.bin"):
        load_bundle(root)


def test_tar_bundle_loads(tmp_path: Path) -> None:
    root = _make(tmp_path)
    tar = tmp_path / "b.tar"
    with tarfile.open(tar, "w") as tf:
        tf.add(root, arcname="b")
    assert load_bundle(tar).name == "t"


def test_cli_verify_exit_codes(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    root = _make(tmp_path)
    assert main(["bundle", "verify", str(root)]) == 0
    bad = tmp_path / "bad"
    shutil.copytree(root, bad)
    (bad / "a.bin").write_bytes(b"x")
    assert main(["bundle", "verify", str(bad)]) == 1
    out = capsys.readouterr()
    assert "a.bin: sha256 does not match" in out.out
    assert main(["bundle", "verify", str(tmp_path / "nope")]) == 2
    assert "not found" in capsys.readouterr().err


def test_refuses_unknown_format(tmp_path: Path) -> None:
    root = _make(tmp_path)
    m = json.loads((root / "manifest.json").read_text())
    m["format"] = "other/9"
    (root / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(SplitedgeError, match="other/9"):
        load_bundle(root)
