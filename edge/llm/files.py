"""An llm bundle's files, read in place and checked as they are read.

A bundle is a directory or an uncompressed .tar of one; nothing is extracted or copied. Small
files (decoder, tokenizer, validation tokens) are read whole when first needed and compared
with their sha256 in the manifest before use, so each is read once. The table is never read
here: `locate` gives its file, byte offset and size for the memory map, and the table checks
its own 1 MiB blocks on first touch (edge.llm.table). A compressed tar is refused: its table
could only be used after decompressing gigabytes to a temporary copy.
"""

from __future__ import annotations

import hashlib
import json
import tarfile
from pathlib import Path
from typing import Any

from splitedge.bundle import FORMAT, MANIFEST, Bundle, not_a_bundle, read_manifest
from splitedge.errors import SplitedgeError


class BundleFiles:
    """A bundle directory or uncompressed .tar: its manifest, located files and verified reads."""

    def __init__(self, source: Bundle | str | Path):
        self._tar: tarfile.TarFile | None = None
        self._members: dict[str, tarfile.TarInfo] = {}
        if isinstance(source, Bundle):
            self.path, self.root, self.manifest = (
                Path(source.root),
                Path(source.root),
                source.manifest,
            )
            return
        self.path = Path(source)
        if self.path.is_dir():
            self.root = self.path
            if not (self.path / MANIFEST).is_file():
                read_manifest(self.path)  # its one-line "not a bundle" error
            self.manifest = self._parse((self.path / MANIFEST).read_bytes())
        elif self.path.is_file() and tarfile.is_tarfile(self.path):
            self.root = self.path
            self.manifest = self._open_tar()
        else:
            raise SplitedgeError(not_a_bundle(self.path))

    @property
    def where(self) -> str:
        return str(self.path)

    def _open_tar(self) -> dict[str, Any]:
        try:
            self._tar = tarfile.open(self.path, "r:")  # "r:" = no decompression
        except tarfile.ReadError:
            raise SplitedgeError(
                f"{self.path} is a compressed tar; an llm bundle's table is read in place, "
                f"which needs an uncompressed tar or the directory: run `tar xf {self.path}` "
                "and pass the directory"
            ) from None
        names = {m.name.removeprefix("./"): m for m in self._tar.getmembers()}
        tops = [n for n in names if n == MANIFEST or n.count("/") == 1 and n.endswith(MANIFEST)]
        if len(tops) != 1:
            raise SplitedgeError(f"{self.path} is a tar without one {MANIFEST}; not a bundle")
        prefix = tops[0][: -len(MANIFEST)]
        self._members = {n[len(prefix) :]: m for n, m in names.items() if n.startswith(prefix)}
        return self._parse(self._member_bytes(MANIFEST))

    def _parse(self, data: bytes) -> dict[str, Any]:
        """The manifest as an object in our format (one-line SplitedgeError otherwise)."""
        try:
            manifest = json.loads(data)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise SplitedgeError(
                f"{self.path}: {MANIFEST} is not valid JSON ({e}); rebuild the bundle"
            ) from None
        if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
            got = manifest.get("format") if isinstance(manifest, dict) else type(manifest).__name__
            raise SplitedgeError(
                f"{self.path}: {MANIFEST} format is {got!r}, this splitedge reads {FORMAT!r}"
            )
        return manifest

    def _member(self, rel: str) -> tarfile.TarInfo:
        member = self._members.get(rel)
        if member is None:
            raise SplitedgeError(f"{self.path} has no {rel}; re-build the bundle's tar")
        if not member.isreg() or member.issparse():
            raise SplitedgeError(
                f"{self.path}: {rel} is not a plain file in the tar (a link, directory or "
                "sparse member) and cannot be read in place; re-build the tar"
            )
        return member

    def _member_bytes(self, rel: str) -> bytes:
        assert self._tar is not None
        f = self._tar.extractfile(self._member(rel))
        assert f is not None
        return f.read()

    def locate(self, rel: str) -> tuple[Path, int, int]:
        """(file, byte offset, size) of a bundle file as stored: for memory-mapping it in place."""
        if self._tar is not None:
            member = self._member(rel)
            return self.path, member.offset_data, member.size
        p = self.root / rel
        if not p.is_file():
            raise SplitedgeError(f"bundle {self.path} is missing {rel}; re-copy the bundle")
        return p, 0, p.stat().st_size

    def read(self, rel: str) -> bytes:
        """A listed file's bytes, refused unless they match the manifest's sha256."""
        want = self.manifest.get("files", {}).get(rel)
        if want is None:
            raise SplitedgeError(f"bundle {self.path} has no file {rel!r} in its manifest")
        if self._tar is not None:
            data = self._member_bytes(rel)
        else:
            p = self.root / rel
            if not p.is_file():
                raise SplitedgeError(f"bundle {self.path} is missing {rel}; re-copy the bundle")
            data = p.read_bytes()
        if hashlib.sha256(data).hexdigest() != want:
            raise SplitedgeError(
                f"bundle {self.path}: {rel} does not match its sha256 in the manifest; "
                "re-copy the bundle"
            )
        return data

    def close(self) -> None:
        if self._tar is not None:
            self._tar.close()
            self._tar = None
