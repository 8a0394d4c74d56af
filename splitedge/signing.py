"""ed25519 signatures over a bundle's manifest.json (the manifest pins every file's sha256).

Keys are standard files, so existing tooling works with them: private keys as
PKCS#8 PEM or OpenSSH (``ssh-keygen -t ed25519``), public keys as PEM or one
OpenSSH line (``ssh-ed25519 AAAA... comment``). The signature file
``manifest.sig`` holds the 64-byte signature in base64 on one line.

`cryptography` is imported lazily so the splitedge core stays stdlib+numpy.
"""

from __future__ import annotations

import base64
import binascii
from pathlib import Path
from typing import Any

from splitedge.bundle import MANIFEST, SIGNATURE
from splitedge.errors import SplitedgeError

_INSTALL_HINT = "install it with `pip install cryptography`"


def _crypto() -> Any:
    try:
        from cryptography.hazmat.primitives.asymmetric import ed25519
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise SplitedgeError(
            f"bundle signatures need the `cryptography` package; {_INSTALL_HINT}"
        ) from e
    return ed25519


def generate_keypair(private_path: Path, public_path: Path) -> str:
    """Write a new ed25519 key pair (PKCS#8 PEM private, mode 0600; OpenSSH public); return the public line."""
    from cryptography.hazmat.primitives import serialization as ser

    ed25519 = _crypto()
    for p in (private_path, public_path):
        if Path(p).exists():
            raise SplitedgeError(f"{p} already exists; move it away or choose another --key path")
    key = ed25519.Ed25519PrivateKey.generate()
    pem = key.private_bytes(ser.Encoding.PEM, ser.PrivateFormat.PKCS8, ser.NoEncryption())
    Path(private_path).parent.mkdir(parents=True, exist_ok=True)
    Path(private_path).touch(mode=0o600)
    Path(private_path).write_bytes(pem)
    line = key.public_key().public_bytes(ser.Encoding.OpenSSH, ser.PublicFormat.OpenSSH).decode()
    Path(public_path).write_text(f"{line} splitedge-bundle-key\n")
    return line


def load_private_key(path: str | Path) -> Any:
    """An Ed25519PrivateKey from a PEM or OpenSSH private key file (unencrypted)."""
    from cryptography.hazmat.primitives import serialization as ser

    ed25519 = _crypto()
    data = _read(path, "private key")
    key: Any
    try:
        if b"OPENSSH PRIVATE KEY" in data:
            key = ser.load_ssh_private_key(data, password=None)
        else:
            key = ser.load_pem_private_key(data, password=None)
    except (ValueError, TypeError) as e:
        raise SplitedgeError(f"{path} is not an unencrypted ed25519 private key ({e})") from e
    if not isinstance(key, ed25519.Ed25519PrivateKey):
        raise SplitedgeError(
            f"{path} is a {type(key).__name__}, not an ed25519 key; make one with `splitedge bundle sign --generate`"
        )
    return key


def load_public_key(path: str | Path) -> Any:
    """An Ed25519PublicKey from a PEM file or an OpenSSH public key line."""
    from cryptography.hazmat.primitives import serialization as ser

    ed25519 = _crypto()
    data = _read(path, "public key").strip()
    key: Any
    try:
        if data.startswith(b"ssh-"):
            key = ser.load_ssh_public_key(b" ".join(data.split()[:2]))
        else:
            key = ser.load_pem_public_key(data)
    except (ValueError, TypeError, binascii.Error) as e:
        raise SplitedgeError(f"{path} is not an ed25519 public key ({e})") from e
    if not isinstance(key, ed25519.Ed25519PublicKey):
        raise SplitedgeError(f"{path} is a {type(key).__name__}, not an ed25519 public key")
    return key


def public_key_line(path: str | Path) -> str:
    """The OpenSSH one-line form of a public key file (a stable fingerprint to show and compare)."""
    from cryptography.hazmat.primitives import serialization as ser

    key = load_public_key(path)
    return str(key.public_bytes(ser.Encoding.OpenSSH, ser.PublicFormat.OpenSSH).decode())


def sign_bundle(root: str | Path, private_key: str | Path) -> Path:
    """Sign root/manifest.json with an ed25519 private key file; write and return root/manifest.sig."""
    root = Path(root)
    manifest = root / MANIFEST
    if not manifest.is_file():
        raise SplitedgeError(f"{root} is not a bundle directory: no {MANIFEST}")
    signature = load_private_key(private_key).sign(manifest.read_bytes())
    out = root / SIGNATURE
    out.write_text(base64.b64encode(signature).decode() + "\n")
    return out


def verify_signature(root: str | Path, public_key: str | Path) -> None:
    """Raise SplitedgeError unless root/manifest.sig is a valid signature of root/manifest.json."""
    from cryptography.exceptions import InvalidSignature

    root = Path(root)
    key = load_public_key(public_key)
    sig_path = root / SIGNATURE
    if not sig_path.is_file():
        raise SplitedgeError(
            f"bundle {root} is not signed (no {SIGNATURE}) but a public key is configured; "
            "sign it with `splitedge bundle sign`"
        )
    try:
        signature = base64.b64decode(sig_path.read_text().strip(), validate=True)
    except (binascii.Error, ValueError) as e:
        raise SplitedgeError(f"{sig_path} is not a base64 signature; re-sign the bundle") from e
    try:
        key.verify(signature, (root / MANIFEST).read_bytes())
    except InvalidSignature as e:
        raise SplitedgeError(
            f"bundle {root}: signature does not match {public_key}; "
            "re-sign it with the matching private key"
        ) from e


def _read(path: str | Path, what: str) -> bytes:
    p = Path(path).expanduser()
    if not p.is_file():
        raise SplitedgeError(f"{what} {p} not found")
    return p.read_bytes()
