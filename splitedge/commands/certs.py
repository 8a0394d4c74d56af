"""`splitedge certs`: a development CA, a server certificate, and per-device certificates and tokens.

    splitedge certs --out certs --devices pi-01,pi-02 --server-name policy.example

writes (keys 0600; an existing CA is reused, so devices can be added later; existing keys
are never overwritten without --force, and the server certificate keeps its names):

    certs/ca.pem, ca.key                       the CA (keep ca.key off the devices)
    certs/server.pem, server.key               for `splitedge serve --tls-cert/--tls-key`
    certs/tokens.txt                           for `splitedge serve --tokens` (hashes only)
    certs/devices/<id>.pem, <id>.key, <id>.token   what each device gets

`splitedge serve --client-ca certs/ca.pem` then asks devices for their certificate (mTLS).
For production, issue certificates from your own PKI; the file layout stays the same.
"""

from __future__ import annotations

import argparse
import datetime as dt
import ipaddress
import os
import re
import secrets
from pathlib import Path
from typing import Any

from splitedge.errors import SplitedgeError, os_errors_in_one_line
from splitedge.output import emit, table

DEVICE_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,62}$")


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "certs",
        help="create a development CA, server and device certificates, device tokens",
        description=(__doc__ or "").split("\n\n")[0],
    )
    p.add_argument("--out", type=Path, required=True, help="directory to write into")
    p.add_argument(
        "--devices", default="", help="comma-separated device ids to issue (may be empty)"
    )
    p.add_argument(
        "--server-name",
        action="append",
        default=[],
        help="DNS name or IP the server is reached by (repeatable); localhost and "
        "127.0.0.1 are always included",
    )
    p.add_argument("--days", type=int, default=365, help="validity (default: %(default)s)")
    p.add_argument(
        "--force",
        action="store_true",
        help="reissue keys that exist already (the server's, and the devices named): their old "
        "certificates and tokens stop working (default: refuse)",
    )
    p.add_argument(
        "--json", action="store_true", help="print the result as JSON instead of a table"
    )
    p.set_defaults(func=run)


@os_errors_in_one_line
def run(args: argparse.Namespace) -> int:
    devices = [d.strip() for d in args.devices.split(",") if d.strip()]
    bad = [d for d in devices if not DEVICE_ID.match(d)]
    if bad:
        raise SplitedgeError(
            f"device ids must be letters, digits, '.', '_' or '-' (up to 63), got {bad}"
        )
    if args.days < 1:
        raise SplitedgeError(f"--days must be >= 1, got {args.days}")
    result = make_certs(args.out, devices, args.server_name, args.days, force=args.force)
    rows = [{"file": f, "for": why} for f, why in result["files"]]
    emit(result, args.json, table(rows, title=f"splitedge certs: {args.out}"))
    return 0


def make_certs(
    out: Path, devices: list[str], server_names: list[str], days: int = 365, force: bool = False
) -> dict[str, Any]:
    """Create (or extend) the development PKI in `out`; returns the files written and why.

    Existing device keys and tokens are refused unless force; an existing server key is kept
    and its certificate reissued only for new names (the old names stay), unless force."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    taken = [
        d
        for d in devices
        if any((out / "devices" / f"{d}{x}").exists() for x in (".key", ".token"))
    ]
    if taken and not force:
        raise SplitedgeError(
            f"device(s) {', '.join(taken)} already have a key and token in {out / 'devices'}; "
            "pass --force to reissue them (their old certificate and token stop working)"
        )
    if (out / "ca.pem").exists() != (out / "ca.key").exists() and not force:
        raise SplitedgeError(
            f"{out} has only one of ca.pem and ca.key; restore the other, or pass --force for a "
            "new CA (every certificate issued by the old one stops working)"
        )
    try:
        out.mkdir(parents=True, exist_ok=True)
        (out / "devices").mkdir(exist_ok=True)
    except OSError as e:
        raise SplitedgeError(f"cannot write to --out {out}: {e.strerror}") from e
    now = dt.datetime.now(dt.timezone.utc)
    files: list[tuple[str, str]] = []

    def name(cn: str) -> x509.Name:
        return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])

    def write_key(path: Path, key: ec.EllipticCurvePrivateKey) -> None:
        pem = key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(pem)

    def issue(
        subject: str, key: Any, ca_key: Any, issuer: x509.Name, extensions: list[Any]
    ) -> x509.Certificate:
        builder = (
            x509.CertificateBuilder()
            .subject_name(name(subject))
            .issuer_name(issuer)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=5))
            .not_valid_after(now + dt.timedelta(days=days))
        )
        for ext, critical in extensions:
            builder = builder.add_extension(ext, critical=critical)
        return builder.sign(ca_key, hashes.SHA256())

    ca_pem, ca_key_path = out / "ca.pem", out / "ca.key"
    if ca_pem.exists() and ca_key_path.exists():
        ca_cert = x509.load_pem_x509_certificate(ca_pem.read_bytes())
        loaded = serialization.load_pem_private_key(ca_key_path.read_bytes(), password=None)
        if not isinstance(loaded, ec.EllipticCurvePrivateKey):
            raise SplitedgeError(f"{ca_key_path} is not an EC key made by `splitedge certs`")
        ca_key = loaded
        files.append((str(ca_pem), "CA (reused)"))
    else:
        ca_key = ec.generate_private_key(ec.SECP256R1())
        ca_cert = issue(
            "splitedge development CA",
            ca_key,
            ca_key,
            name("splitedge development CA"),
            [
                (x509.BasicConstraints(ca=True, path_length=0), True),
                (x509.KeyUsage(False, False, False, False, False, True, True, False, False), True),
            ],
        )
        ca_pem.write_bytes(ca_cert.public_bytes(serialization.Encoding.PEM))
        write_key(ca_key_path, ca_key)
        files += [
            (str(ca_pem), "CA certificate: servers and devices trust it"),
            (str(ca_key_path), "CA key: keep it off devices"),
        ]

    leaf = [(x509.BasicConstraints(ca=False, path_length=None), True)]
    server_pem, server_key_path = out / "server.pem", out / "server.key"
    old_names, old_cn = _server_names(server_pem)
    names = list(dict.fromkeys(["localhost", "127.0.0.1", *old_names, *server_names]))
    sans: list[x509.GeneralName] = []
    for n in names:
        try:
            sans.append(x509.IPAddress(ipaddress.ip_address(n)))
        except ValueError:
            sans.append(x509.DNSName(n))
    keep_key = server_key_path.exists() and server_pem.exists() and not force
    if keep_key and set(names) == set(old_names):
        files.append((str(server_pem), f"server certificate for {', '.join(names)} (reused)"))
        return _devices(out, devices, ca_key, ca_cert, issue, write_key, leaf, names, files)
    if keep_key:
        loaded = serialization.load_pem_private_key(server_key_path.read_bytes(), password=None)
        if not isinstance(loaded, ec.EllipticCurvePrivateKey):
            raise SplitedgeError(f"{server_key_path} is not an EC key made by `splitedge certs`")
        server_key = loaded
    else:
        server_key = ec.generate_private_key(ec.SECP256R1())
    server_cert = issue(
        server_names[-1] if server_names else old_cn or "localhost",
        server_key,
        ca_key,
        ca_cert.subject,
        [
            *leaf,
            (x509.SubjectAlternativeName(sans), False),
            (x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), False),
        ],
    )
    server_pem.write_bytes(server_cert.public_bytes(serialization.Encoding.PEM))
    files.append((str(server_pem), f"server certificate for {', '.join(names)}"))
    if keep_key:
        files.append((str(server_key_path), "server key (kept)"))
    else:
        write_key(server_key_path, server_key)
        files.append((str(server_key_path), "server key"))
    return _devices(out, devices, ca_key, ca_cert, issue, write_key, leaf, names, files)


def _server_names(pem: Path) -> tuple[list[str], str | None]:
    """The names (subject alternative names) and common name of an existing server certificate."""
    from cryptography import x509
    from cryptography.x509.oid import NameOID

    if not pem.is_file():
        return [], None
    try:
        cert = x509.load_pem_x509_certificate(pem.read_bytes())
        sans = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except (ValueError, x509.ExtensionNotFound):
        return [], None
    names = [str(v) for v in sans.get_values_for_type(x509.IPAddress)]
    names = sans.get_values_for_type(x509.DNSName) + names
    cn = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    return names, (str(cn[0].value) if cn else None)


def _devices(
    out: Path,
    devices: list[str],
    ca_key: Any,
    ca_cert: Any,
    issue: Any,
    write_key: Any,
    leaf: list[Any],
    names: list[str],
    files: list[tuple[str, str]],
) -> dict[str, Any]:
    """Issue each device's certificate, key and token; record the token hashes."""
    from cryptography import x509
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID

    from server.auth import hash_token

    tokens_path = out / "tokens.txt"
    lines = _token_lines(tokens_path)
    for device in devices:
        key = ec.generate_private_key(ec.SECP256R1())
        cert = issue(
            device,
            key,
            ca_key,
            ca_cert.subject,
            [*leaf, (x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]), False)],
        )
        base = out / "devices" / device
        base.with_suffix(".pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        write_key(base.with_suffix(".key"), key)
        token = secrets.token_urlsafe(32)
        fd = os.open(base.with_suffix(".token"), os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(token + "\n")
        lines[device] = hash_token(token)
        files.append(
            (f"{base}.pem/.key/.token", f"device {device}: certificate, key, bearer token")
        )
    tokens_path.write_text(
        "# splitedge device tokens: <device-id> sha256:<hex of the token>\n"
        + "".join(f"{d} {h}\n" for d, h in lines.items())
    )
    files.append((str(tokens_path), f"server's token hashes ({len(lines)} devices)"))
    return {"out": str(out), "devices": devices, "server_names": names, "files": files}


def _token_lines(path: Path) -> dict[str, str]:
    """Existing device -> hash lines, so issuing more devices keeps the earlier ones."""
    if not path.exists():
        return {}
    table: dict[str, str] = {}
    for line in path.read_text().splitlines():
        fields = line.split("#", 1)[0].split()
        if len(fields) == 2:
            table[fields[0]] = fields[1]
    return table
