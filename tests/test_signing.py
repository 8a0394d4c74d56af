"""Bundle signatures: checked against the `cryptography` ed25519 primitives and ssh-keygen keys."""

from __future__ import annotations

import base64
import json
import shutil
import subprocess
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization as ser
from cryptography.hazmat.primitives.asymmetric import ed25519

from splitedge.bundle import load_bundle
from splitedge.cli import main
from splitedge.errors import SplitedgeError
from splitedge.signing import generate_keypair, sign_bundle, verify_signature
from tests.conftest import ZOO_BUNDLE


@pytest.fixture
def bundle(tmp_path: Path) -> Path:
    out = tmp_path / "bundle"
    shutil.copytree(ZOO_BUNDLE, out)
    return out


@pytest.fixture
def keys(tmp_path: Path) -> tuple[Path, Path]:
    priv, pub = tmp_path / "k", tmp_path / "k.pub"
    generate_keypair(priv, pub)
    return priv, pub


def test_signature_is_plain_ed25519_over_the_manifest_bytes(
    bundle: Path, keys: tuple[Path, Path]
) -> None:
    priv, pub = keys
    sig = sign_bundle(bundle, priv)
    assert oct(priv.stat().st_mode & 0o777) == "0o600"
    raw_pub = ser.load_ssh_public_key(b" ".join(pub.read_bytes().split()[:2]))
    assert isinstance(raw_pub, ed25519.Ed25519PublicKey)
    # independent check with the library primitive: raises InvalidSignature if wrong
    raw_pub.verify(base64.b64decode(sig.read_text()), (bundle / "manifest.json").read_bytes())
    load_bundle(bundle, public_key=pub)


def test_a_signature_made_by_the_library_verifies(bundle: Path, tmp_path: Path) -> None:
    key = ed25519.Ed25519PrivateKey.generate()
    pem = tmp_path / "pub.pem"
    pem.write_bytes(
        key.public_key().public_bytes(ser.Encoding.PEM, ser.PublicFormat.SubjectPublicKeyInfo)
    )
    (bundle / "manifest.sig").write_text(
        base64.b64encode(key.sign((bundle / "manifest.json").read_bytes())).decode()
    )
    verify_signature(bundle, pem)


def test_ssh_keygen_keys_work(bundle: Path, tmp_path: Path) -> None:
    if not shutil.which("ssh-keygen"):
        pytest.skip("ssh-keygen is not installed (openssh-client)")
    key = tmp_path / "id_ed25519"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(key)], check=True)
    sign_bundle(bundle, key)
    verify_signature(bundle, Path(f"{key}.pub"))


def test_wrong_key_tampered_manifest_and_missing_signature_are_refused(
    bundle: Path, keys: tuple[Path, Path], tmp_path: Path
) -> None:
    priv, pub = keys
    other_priv, other_pub = tmp_path / "o", tmp_path / "o.pub"
    generate_keypair(other_priv, other_pub)
    with pytest.raises(SplitedgeError, match="not signed"):
        load_bundle(bundle, public_key=pub)
    sign_bundle(bundle, priv)
    with pytest.raises(SplitedgeError, match="signature does not match"):
        load_bundle(bundle, public_key=other_pub)
    manifest = json.loads((bundle / "manifest.json").read_text())
    manifest["version"] = "6.6.6"  # a re-written manifest keeps the old signature
    (bundle / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(SplitedgeError, match="signature does not match"):
        load_bundle(bundle, public_key=pub)


def test_a_corrupted_file_fails_before_the_signature(bundle: Path, keys: tuple[Path, Path]) -> None:
    priv, pub = keys
    sign_bundle(bundle, priv)
    with open(bundle / "head.onnx", "r+b") as f:
        f.seek(100)
        f.write(b"\x00\xff")
    with pytest.raises(SplitedgeError, match="head.onnx: sha256"):
        load_bundle(bundle, public_key=pub)


def test_sign_command_generates_a_key_and_refuses_to_overwrite(
    bundle: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    key = tmp_path / "keys" / "release.key"
    assert main(["bundle", "sign", str(bundle), "--key", str(key), "--generate", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["generated_key"] is True and out["public_key_line"].startswith("ssh-ed25519 ")
    verify_signature(bundle, Path(f"{key}.pub"))
    with pytest.raises(SplitedgeError, match="already exists"):
        generate_keypair(key, Path(f"{key}.pub"))
    assert main(["bundle", "sign", str(bundle), "--key", str(tmp_path / "missing")]) == 2


def test_verify_and_serve_with_a_key_refuse_an_edited_or_unsigned_bundle(
    bundle: Path,
    keys: tuple[Path, Path],
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    import server.app

    priv, pub = keys
    started = []
    monkeypatch.setattr(server.app, "serve", lambda cfg, on_ready=None: started.append(cfg) or 0)
    serve = ["serve", "--bundle", str(bundle), "--port", "0", "--public-key", str(pub)]
    verify = ["bundle", "verify", str(bundle), "--public-key", str(pub)]
    assert main(verify) == 1 and "is not signed" in capsys.readouterr().err
    assert main(serve) == 2 and not started
    sign_bundle(bundle, priv)
    assert main(verify) == 0 and "signature valid" in capsys.readouterr().out
    assert main(serve) == 0 and len(started) == 1
    # an edited manifest: every file still matches it, only the signature can tell
    manifest = json.loads((bundle / "manifest.json").read_text())
    manifest["version"] = "9.9.9"
    (bundle / "manifest.json").write_text(json.dumps(manifest))
    assert main(["bundle", "verify", str(bundle)]) == 0, "hashes alone cannot see it"
    capsys.readouterr()
    assert main(verify) == 1
    err = capsys.readouterr().err.strip()
    assert "signature does not match" in err and len(err.splitlines()) == 1
    assert main(serve) == 2 and len(started) == 1, "serve refused it before listening"
    assert main(["bundle", "verify", str(bundle), "--public-key", str(bundle / "nope")]) == 2
