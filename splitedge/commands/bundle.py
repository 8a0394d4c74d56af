"""`splitedge bundle verify|sign`: check bundles against their manifests, sign them."""

from __future__ import annotations

import argparse
from pathlib import Path

from splitedge.bundle import load_bundle, read_manifest, verify_files
from splitedge.errors import SplitedgeError, os_errors_in_one_line
from splitedge.output import emit


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("bundle", help="verify and sign bundles")
    bsub = p.add_subparsers(dest="bundle_command", metavar="ACTION", required=True)
    v = bsub.add_parser(
        "verify",
        help="check every file's sha256 against the manifest (and its signature with a key)",
        description="Exit 0 if every file matches its manifest sha256 and, with --public-key, "
        "manifest.sig is a valid ed25519 signature of the manifest by that key (so every file "
        "is the signer's); otherwise name each problem and exit 1.",
    )
    v.add_argument("bundle", type=Path, help="bundle directory or .tar")
    v.add_argument(
        "--public-key",
        type=Path,
        default=None,
        help="ed25519 public key (OpenSSH line or PEM): also require a valid signature by it "
        "(default: hashes only; an unsigned or edited bundle still verifies)",
    )
    v.add_argument(
        "--json", action="store_true", help="print the result as JSON instead of a table"
    )
    v.set_defaults(func=verify)
    s = bsub.add_parser(
        "sign",
        help="sign a bundle's manifest with an ed25519 key",
        description="Write manifest.sig: an ed25519 signature over manifest.json, "
        "which pins every file's sha256. A device with a public key configured "
        "refuses bundles whose signature does not verify.",
    )
    s.add_argument("bundle", type=Path, help="bundle directory")
    s.add_argument(
        "--key",
        type=Path,
        required=True,
        help="ed25519 private key (PKCS#8 PEM or OpenSSH, unencrypted)",
    )
    s.add_argument(
        "--generate",
        action="store_true",
        help="create the key pair first (KEY and KEY.pub) if KEY does not exist",
    )
    s.add_argument(
        "--json", action="store_true", help="print the result as JSON instead of a table"
    )
    s.set_defaults(func=sign)


@os_errors_in_one_line
def verify(args: argparse.Namespace) -> int:
    bundle = load_bundle(args.bundle, verify=False)
    problems = verify_files(bundle.root, read_manifest(bundle.root))
    signature = "not checked (no --public-key)"
    if args.public_key is not None:
        from splitedge.signing import load_public_key, verify_signature

        load_public_key(
            args.public_key
        )  # an unreadable key is the caller's error, not the bundle's
        try:
            verify_signature(bundle.root, args.public_key)
            signature = f"valid, by {args.public_key}"
        except SplitedgeError as e:
            signature = "INVALID"
            problems.append(str(e))
    result = {
        "bundle": str(args.bundle),
        "name": bundle.name,
        "version": bundle.version,
        "files": len(bundle.manifest.get("files", {})),
        "signature": signature,
        "ok": not problems,
        "problems": problems,
    }
    if problems:
        text = f"{args.bundle}: FAILED\n" + "\n".join(f"  {p}" for p in problems)
    else:
        text = (
            f"{args.bundle}: OK ({result['files']} files match, {bundle.name} {bundle.version}; "
            f"signature {signature})"
        )
    emit(result, args.json, text)
    if problems:
        raise SplitedgeError(
            f"{args.bundle}: " + "; ".join(problems[:3]) + (" ..." if len(problems) > 3 else ""),
            exit_code=1,
        )
    return 0


@os_errors_in_one_line
def sign(args: argparse.Namespace) -> int:
    from splitedge.signing import generate_keypair, public_key_line, sign_bundle, verify_signature

    bundle = load_bundle(args.bundle)  # never sign files that do not match their manifest
    public = Path(f"{args.key}.pub")
    generated = False
    if args.generate and not args.key.exists():
        generate_keypair(args.key, public)
        generated = True
    sig = sign_bundle(bundle.root, args.key)
    result = {
        "bundle": str(args.bundle),
        "name": bundle.name,
        "version": bundle.version,
        "signature": str(sig),
        "key": str(args.key),
        "generated_key": generated,
    }
    if public.is_file():
        verify_signature(bundle.root, public)  # prove the pair matches before anyone relies on it
        result["public_key"] = str(public)
        result["public_key_line"] = public_key_line(public)
    text = f"{args.bundle}: signed {bundle.name} {bundle.version} -> {sig}"
    if generated:
        text += f"\nnew key pair: {args.key} (keep private), {public} (give to devices: flash --public-key)"
    emit(result, args.json, text)
    return 0
