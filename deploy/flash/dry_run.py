"""`splitedge flash --dry-run`: every check a flash makes before copying, and its plan.

The local checks (bundle hashes and signature, profile, backend, encoder limits) run
here; then, unless told not to, the device's pre-flight over ssh, read-only. The first
failure raises SplitedgeError with the reason; nothing anywhere is changed.
"""

from __future__ import annotations

import dataclasses
import shlex
from pathlib import Path
from typing import Any

from deploy.flash.flasher import FlashOptions, check_device, check_locally
from splitedge.errors import SplitedgeError


def dry_run(opts: FlashOptions, contact: bool = True) -> dict[str, Any]:
    """Every check a flash makes before copying, changing nothing: the local ones, then (contact)
    the device's pre-flight over ssh, read-only. Raises SplitedgeError at the first failure."""
    c = check_locally(opts)
    checks = [
        {
            "check": "bundle",
            "result": f"{c.release}: hashes ok"
            + (
                f", signature ok ({opts.public_key})"
                if opts.public_key
                else ", signature not checked (no --public-key)"
            ),
        },
        {"check": "profile", "result": opts.profile or "(none: generic checks)"},
    ]
    if not c.llm:
        checks.append({"check": "backend", "result": str(opts.service.get("backend", "auto"))})
    checks += [{"check": r["check"], "result": r["device"]} for r in c.rows]
    out: dict[str, Any] = {"dry_run": True, "ok": True, "release": c.release}
    if contact:
        t = opts.transport()
        facts = t.op("facts", opts.root, timeout_s=60, read_only=True)
        rows, problems, _, service = check_device(opts, c, facts)
        if problems:
            raise SplitedgeError(
                f"dry run: pre-flight would fail on {t.target} (nothing was changed): "
                + "; ".join(problems)
            )
        checks.append(
            {
                "check": "device",
                "result": f"{t.target} answers: {facts['arch']}, Python {facts['python']}, "
                f"root {facts['root']}, current {facts['current'] or '(none)'}",
            }
        )
        checks += [{"check": r["check"], "result": f"{r['device']} ({r['ok']})"} for r in rows]
        if not c.llm:
            checks.append(
                {
                    "check": "backend on the device",
                    "result": f"{service['backend']}: {service['backend_reason']}",
                }  # fmt: skip
            )
        opts = dataclasses.replace(opts, root=facts["root"])
    out["checks"] = checks
    out["plan"] = dry_run_plan(opts)
    return out


def dry_run_plan(opts: FlashOptions) -> list[dict[str, str]]:
    """The steps and the exact commands a flash would run, without contacting the device."""
    from splitedge.bundle import read_manifest

    t = opts.transport()
    root = opts.root or "<root>"  # the device's $SPLITEDGE_ROOT, else /opt/splitedge: only it knows
    try:
        manifest = read_manifest(Path(opts.bundle))
        rel = f"{manifest['name']}-{manifest['version']}"
    except SplitedgeError:
        rel = "<name>-<version>"
    py = f"{root}/runtimes/<key>/venv/bin/python"
    return [
        {
            "step": "load",
            "command": f"verify {opts.bundle} hashes"
            + (f" and signature ({opts.public_key})" if opts.public_key else ""),
        },
        {
            "step": "pre-flight",
            "command": shlex.join(t.ssh_argv([opts.device_python, "-", "facts"])) + "  < remote.py",
            "checks": f"profile {opts.profile or '(none: generic checks)'}"
            + (" and the encoder's fit to its GPU limits (here, first)" if opts.profile else ""),
        },
        {
            "step": "package",
            "command": "build splitedge wheel (edge, protos, splitedge only)"
            + (", pip download every dependency for the device's platform" if opts.offline else "")
            + "; probe features with encoder.onnx; service.json; systemd unit"
            + " (an llm bundle: none of these, its probe is in the manifest)",
        },
        {
            "step": "transfer",
            "command": shlex.join(
                t.rsync_argv(Path("<wheelhouse>"), f"{root}/wheelhouse", opts.bwlimit_kbps)
            ),
        },
        {
            "step": "transfer",
            "command": shlex.join(
                t.rsync_argv(Path("<release>"), f"{root}/incoming/{rel}", opts.bwlimit_kbps)
            ),
        },
        {"step": "stage", "command": f"hash-check incoming/{rel}, rename it to releases/{rel}"},
        {
            "step": "runtime",
            "command": f"python3 -m venv {root}/runtimes/<key>/venv; pip install "
            + ("--no-index " if opts.offline else "")
            + f"--find-links {root}/wheelhouse splitedge[edge] cryptography"
            + (
                f"; pip install --no-deps --target releases/{rel}/packages "
                + " ".join(f"<{p}>" for p in opts.env_packages)
                if opts.env_packages
                else ""
            ),
        },
        {
            "step": "verify",
            "command": f"{py} -m edge.service verify --release {root}/releases/{rel}"
            + " [--public-key etc/signing.pub]",
        },
        {
            "step": "switch",
            "command": f"start the device's commit watchdog ({opts.commit_deadline_s:g} s), then "
            f"ln -sfn releases/{rel} .current.tmp && mv -T .current.tmp current; "
            "restart systemd unit or supervisor; the release is pending",
        },
        {
            "step": "health",
            "command": f"{py} -m edge.service health --release {root}/current"
            + f" (server {opts.server or 'from the current release'}; an llm bundle: its greedy "
            "probe, no server); on failure: revert now",
        },
        {
            "step": "commit",
            "command": "confirm the pending release on the device; unconfirmed after "
            f"{opts.commit_deadline_s:g} s, the device reverts to the previous one by itself",
        },
    ]
