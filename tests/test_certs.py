"""`splitedge certs` never overwrites keys silently, and keeps the server certificate's names."""

from __future__ import annotations

from pathlib import Path

import pytest
from cryptography import x509

from splitedge.cli import main


def _names(pem: Path) -> set[str]:
    cert = x509.load_pem_x509_certificate(pem.read_bytes())
    sans = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    return {str(n) for n in sans.get_values_for_type(x509.DNSName)} | {
        str(n) for n in sans.get_values_for_type(x509.IPAddress)
    }


def test_existing_keys_are_refused_without_force_and_server_names_are_kept(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "certs"
    base = ["certs", "--out", str(out)]
    assert main([*base, "--devices", "pi-01", "--server-name", "policy.lan"]) == 0
    token = (out / "devices" / "pi-01.token").read_text()
    server_key = (out / "server.key").read_bytes()
    capsys.readouterr()

    assert main([*base, "--devices", "pi-01"]) == 2
    err = capsys.readouterr().err.strip()
    assert "pi-01 already have a key and token" in err and "--force" in err
    assert len(err.splitlines()) == 1 and (out / "devices" / "pi-01.token").read_text() == token

    # another device and another name: the server key stays, its certificate keeps policy.lan
    assert main([*base, "--devices", "pi-02", "--server-name", "10.0.0.5"]) == 0
    assert (out / "server.key").read_bytes() == server_key
    assert {"policy.lan", "10.0.0.5", "localhost", "127.0.0.1"} <= _names(out / "server.pem")
    assert (out / "devices" / "pi-01.token").read_text() == token
    tokens = (out / "tokens.txt").read_text()
    assert "pi-01 " in tokens and "pi-02 " in tokens

    assert main([*base, "--devices", "pi-01", "--force"]) == 0
    assert (out / "devices" / "pi-01.token").read_text() != token
    assert (out / "server.key").read_bytes() != server_key, "--force reissues the server key"
    assert {"policy.lan", "10.0.0.5"} <= _names(out / "server.pem"), "and keeps its names"
