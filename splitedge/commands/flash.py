"""`splitedge flash`: put a bundle on a device (or a fleet) over ssh, with a health gate and rollback."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from splitedge.commands._env_options import env_kwargs
from splitedge.output import emit, table


def add_ssh_options(p: argparse.ArgumentParser) -> None:
    """How to reach devices: options shared by flash, status and rollback."""
    p.add_argument(
        "--root",
        default=None,
        help="install root on the device (default: its $SPLITEDGE_ROOT, else /opt/splitedge)",
    )
    p.add_argument(
        "--ssh-config",
        type=Path,
        default=None,
        help="ssh config file instead of ~/.ssh/config (e.g. the emulated device's)",
    )
    p.add_argument(
        "--ssh-option",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="extra `ssh -o` option, repeatable",
    )
    p.add_argument(
        "--device-python",
        default="python3",
        help="python on the device, 3.10+ (default: %(default)s)",
    )
    p.add_argument(
        "--json", action="store_true", help="print the result as JSON instead of a table"
    )


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "flash",
        help="install a bundle on a device over ssh (pre-flight, health gate, rollback)",
        description="Pre-flight the device against its profile, copy the bundle with rsync (resumable), "
        "verify hashes and signature on the device, install the edge runtime into its own venv, switch "
        "the `current` release atomically, restart the service, and run the health gate (probe frame "
        "vs expected features, one round trip to the policy server; for an llm bundle, greedy-decode "
        "the prompt recorded at fold time and require the same token ids). Any failure after the switch "
        "rolls back to the previous release. Uses your ssh and rsync, so ~/.ssh/config and agents work.",
    )
    target = p.add_mutually_exclusive_group(required=True)
    target.add_argument("--host", help="USER@HOST[:PORT] or an ssh config alias")
    target.add_argument(
        "--fleet",
        type=Path,
        help="TOML fleet file: canary first, then the rest, stop at the first failure",
    )
    p.add_argument(
        "--bundle", type=Path, required=True, help="policy or llm bundle directory or .tar"
    )
    p.add_argument("--profile", default=None, help="device profile: pi-zero-2w, pi-4b, jetson-nano")
    p.add_argument(
        "--server",
        default=None,
        help="policy server HOST:PORT as seen from the device "
        "(default: the one the device's current release uses; an llm bundle needs none)",
    )
    p.add_argument(
        "--offline",
        action="store_true",
        help="carry every wheel of the edge runtime; the device needs no package index",
    )
    p.add_argument(
        "--public-key",
        type=Path,
        default=None,
        help="ed25519 public key: check the bundle's signature here and make the device require it",
    )
    p.add_argument(
        "--source",
        default="env",
        help="frames: env[:ID_OR_ENTRY_POINT] (a gymnasium id, one of our tasks or "
        "package.module:ClassName; bare env: the env the bundle records), camera[:/dev/videoN], "
        "video:PATH (default: %(default)s)",
    )
    p.add_argument(
        "--env-kwargs",
        default=None,
        metavar="JSON",
        help="keyword arguments for an env source, as a JSON object (default: the ones the "
        "bundle records for its env)",
    )
    p.add_argument(
        "--env-package",
        action="append",
        type=Path,
        default=[],
        metavar="PATH",
        help="your env's code for an env source, repeatable: a wheel, a project folder "
        "(pyproject.toml/setup.py), or the folder holding the module of a "
        "package.module:ClassName env; installed without dependencies into the release on "
        "the device (default: none; the env must come with the edge runtime)",
    )
    p.add_argument(
        "--sink",
        default="socket",
        help="actions: socket[:PATH], entrypoint:pkg.mod:func, log (default: %(default)s)",
    )
    p.add_argument(
        "--rate-hz",
        type=float,
        default=20.0,
        help="service decisions per second, 0 = unpaced (default: %(default)s)",
    )
    p.add_argument(
        "--backend", default="auto", help="encoder backend on the device (default: %(default)s)"
    )
    p.add_argument(
        "--bwlimit", type=int, default=None, metavar="KBPS", help="rsync bandwidth limit in KiB/s"
    )
    p.add_argument(
        "--pip-arg",
        action="append",
        default=[],
        metavar="ARG",
        help="extra pip argument, repeatable, e.g. --pip-arg=--extra-index-url=https://www.piwheels.org/simple",
    )
    p.add_argument(
        "--dry-run", action="store_true", help="print the plan and the commands; contact nothing"
    )
    add_ssh_options(p)
    p.set_defaults(func=run)


def _options(args: argparse.Namespace, host: str, overrides: dict[str, Any] | None = None) -> Any:
    from deploy.flash.flasher import FlashOptions

    o = FlashOptions(
        host=host,
        bundle=args.bundle,
        profile=args.profile,
        server=args.server,
        root=args.root,
        offline=args.offline,
        public_key=args.public_key,
        source=args.source,
        env_kwargs=env_kwargs(args.env_kwargs),
        env_packages=args.env_package,
        sink=args.sink,
        service={"rate_hz": args.rate_hz, "backend": args.backend},
        ssh_config=args.ssh_config,
        ssh_options=args.ssh_option,
        device_python=args.device_python,
        bwlimit_kbps=args.bwlimit,
        pip_args=args.pip_arg,
    )
    for key, value in (overrides or {}).items():
        setattr(o, key, value)
    return o


def run(args: argparse.Namespace) -> int:
    from deploy.flash.flasher import dry_run_plan, flash

    def log(line: str) -> None:
        if not args.json:
            print(line, file=sys.stderr, flush=True)

    if args.fleet:
        from deploy.flash.fleet import flash_fleet, load_fleet

        devices = load_fleet(args.fleet)
        if args.dry_run:
            rows = [
                {
                    "order": i + 1,
                    "host": d.host,
                    "profile": d.overrides.get("profile", args.profile),
                    "role": "canary" if d.canary else "",
                }
                for i, d in enumerate(devices)
            ]
            emit(
                {"fleet": rows},
                args.json,
                table(rows, title="fleet plan (canary first, stop at first failure)"),
            )
            return 0
        result = flash_fleet(
            devices, lambda d: flash(_options(args, d.host, d.overrides), log=log), log=log
        )
        emit(
            result,
            args.json,
            table(result["devices"], title=f"fleet {args.fleet}: {result['summary']}"),
        )
        return 0 if result["ok"] else 1
    opts = _options(args, args.host)
    if args.dry_run:
        plan = dry_run_plan(opts)
        text = "\n".join(f"{i + 1:>2}. {s['step']:<10} {s['command']}" for i, s in enumerate(plan))
        emit(
            {"dry_run": True, "plan": plan},
            args.json,
            f"flash plan for {args.host} (dry run, nothing contacted):\n{text}"
            + ("" if args.root else "\n<root>: the device's $SPLITEDGE_ROOT, else /opt/splitedge"),
        )
        return 0
    log(f"flashing {args.bundle} to {args.host}")
    result = flash(opts, log=log)
    text = table(
        result["steps"],
        title=f"{result['host']}: {result['release']} is current (was {result['previous'] or 'empty'})",
    )
    emit(result, args.json, text)
    return 0
