"""Bundle v1: a directory (or .tar of one) with manifest.json and the sha256 of every file.

Layout of a policy bundle::

    manifest.json        format, kind, name, version, created, files{path: sha256}, policy{...}
    encoder_ir.json      layer IR of the device encoder (see splitedge.ir)
    encoder_weights.npz  its weights, keyed by the names in the IR
    encoder.onnx         uint8 observation -> features (CPU fallback): uint8 quantised with
                         policy.encoder.output's scale/zero_point, or float32 as they are
    head.onnx            features (that dtype) -> action (server side)
    full.onnx            uint8 observation -> action (raw-offload baseline)
    manifest.sig         optional ed25519 signature over manifest.json
"""

from __future__ import annotations

import hashlib
import json
import tarfile
import tempfile
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from splitedge.errors import SplitedgeError

FORMAT = "splitedge-bundle/1"
MANIFEST = "manifest.json"
SIGNATURE = "manifest.sig"
KINDS = ("policy", "llm")
_NOT_HASHED = {MANIFEST, SIGNATURE}


def sha256_file(path: Path) -> str:
    """Hex sha256 of a file, read in 1 MiB chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _bundle_files(root: Path) -> list[str]:
    return sorted(
        p.relative_to(root).as_posix()
        for p in root.rglob("*")
        if p.is_file() and p.relative_to(root).as_posix() not in _NOT_HASHED
    )


def write_manifest(root: Path, manifest: dict[str, Any]) -> dict[str, Any]:
    """Hash every file under root, add format/files, write manifest.json and return it."""
    root = Path(root)
    if manifest.get("kind") not in KINDS:
        raise ValueError(f"manifest kind must be one of {KINDS}, got {manifest.get('kind')!r}")
    for key in ("name", "version"):
        if not manifest.get(key):
            raise ValueError(f"manifest needs a non-empty {key!r}")
    out = {"format": FORMAT, **manifest}
    out["files"] = {rel: sha256_file(root / rel) for rel in _bundle_files(root)}
    (root / MANIFEST).write_text(json.dumps(out, indent=2, sort_keys=False) + "\n")
    sig = root / SIGNATURE
    if sig.exists():  # a stale signature would fail verification; re-sign explicitly
        sig.unlink()
    return out


@dataclass
class Bundle:
    """A bundle on disk with its parsed manifest."""

    root: Path
    manifest: dict[str, Any]
    _tmp: Any = field(default=None, repr=False)

    @property
    def kind(self) -> str:
        return str(self.manifest["kind"])

    @property
    def name(self) -> str:
        return str(self.manifest["name"])

    @property
    def version(self) -> str:
        return str(self.manifest["version"])

    @property
    def policy(self) -> dict[str, Any]:
        if self.kind != "policy":
            raise SplitedgeError(
                f"bundle {self.root} is a {self.kind!r} bundle, not a policy bundle"
            )
        return dict(self.manifest["policy"])

    def file(self, rel: str) -> Path:
        """Path of a file listed in the manifest."""
        if rel not in self.manifest.get("files", {}):
            raise SplitedgeError(f"bundle {self.root} has no file {rel!r} in its manifest")
        return self.root / rel


def verify_files(root: Path, manifest: dict[str, Any]) -> list[str]:
    """Problems found comparing the files on disk with the manifest (empty = good)."""
    problems = []
    listed = manifest.get("files", {})
    for rel, digest in sorted(listed.items()):
        p = root / rel
        if not p.is_file():
            problems.append(f"{rel}: missing")
        elif sha256_file(p) != digest:
            problems.append(f"{rel}: sha256 does not match the manifest")
    for rel in _bundle_files(root):
        if rel not in listed:
            problems.append(f"{rel}: not listed in the manifest")
    return problems


def is_sb3_model(path: Path) -> bool:
    """A Stable-Baselines3 save (model.zip, .sb3.zip): a zip with `data` and `policy.pth`."""
    try:
        with zipfile.ZipFile(path) as z:
            names = set(z.namelist())
    except (OSError, zipfile.BadZipFile):
        return False
    return {"data", "policy.pth"} <= names


def not_a_bundle(path: Path) -> str:
    """Why `path`, given as a bundle but neither a directory nor a .tar, is not one: what to do."""
    if not path.exists():
        return f"bundle {path} not found (expected a directory or a .tar)"
    if is_sb3_model(path):
        return (
            f"{path} is a Stable-Baselines3 model, not a bundle; make a bundle from it with "
            f"`splitedge export --model {path} --out DIR` and pass DIR"
        )
    kind = "a zip archive" if zipfile.is_zipfile(path) else "a file"
    return f"{path} is {kind}, not a bundle (expected a bundle directory or a .tar of one)"


def read_manifest(root: Path) -> dict[str, Any]:
    """A bundle directory's manifest.json, checked for our format (SplitedgeError otherwise)."""
    if not Path(root).is_dir():
        raise SplitedgeError(not_a_bundle(Path(root)))
    mpath = root / MANIFEST
    if not mpath.is_file():
        raise SplitedgeError(
            f"{root} is not a bundle: no {MANIFEST}. Build one with `splitedge export`."
        )
    try:
        manifest = json.loads(mpath.read_text())
    except json.JSONDecodeError as e:
        raise SplitedgeError(f"{mpath} is not valid JSON ({e}); rebuild the bundle") from e
    if manifest.get("format") != FORMAT:
        raise SplitedgeError(
            f"{mpath}: format is {manifest.get('format')!r}, this splitedge reads {FORMAT!r}"
        )
    return dict(manifest)


def load_bundle(
    path: str | Path, verify: bool = True, public_key: str | Path | None = None
) -> Bundle:
    """Open a bundle directory or .tar; with verify, refuse it if any file does not match.

    With public_key (an ed25519 key file), also refuse it unless manifest.sig is a valid
    signature of manifest.json by that key (see splitedge.signing).
    """
    path = Path(path)
    tmp = None
    if path.is_file() and tarfile.is_tarfile(path):
        tmp = tempfile.TemporaryDirectory(prefix="splitedge-bundle-")
        with tarfile.open(path) as tf:
            tf.extractall(tmp.name, filter="data")
        entries = list(Path(tmp.name).iterdir())
        root = entries[0] if len(entries) == 1 and entries[0].is_dir() else Path(tmp.name)
    elif path.is_dir():
        root = path
    else:
        raise SplitedgeError(not_a_bundle(path))
    manifest = read_manifest(root)
    if verify:
        problems = verify_files(root, manifest)
        if problems:
            raise SplitedgeError(
                f"bundle {path} failed verification: {'; '.join(problems)}. Rebuild or re-copy it."
            )
    if public_key is not None:
        from splitedge.signing import verify_signature

        verify_signature(root, public_key)
    return Bundle(root=root, manifest=manifest, _tmp=tmp)
