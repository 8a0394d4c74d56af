"""`splitedge flash`: put a bundle on a device (or a fleet) over ssh, with a health gate and rollback."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from splitedge.commands._env_options import env_kwargs
from splitedge.errors import os_errors_in_one_line
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


def device_transport(args: argparse.Namespace) -> Any:
    """The ssh transport to --host that the options of add_ssh_options describe."""
    from deploy.flash.transport import Target, Transport

    return Transport(
        Target.parse(args.host),
        ssh_config=args.ssh_config,
        ssh_options=args.ssh_option,
        device_python=args.device_python,
    )


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "flash",
        help="install a bundle on a device over ssh (pre-flight, health gate, rollback)",
        description="Pre-flight the device against its profile, copy the bundle with rsync (resumable), "
        "verify hashes and signature on the device, install the edge runtime into its own venv, switch "
        "the `current` release atomically, restart the service, and run the health gate (probe frame "
        "vs expected features, one round trip to the policy server; for an llm bundle, greedy-decode "
        "the prompt recorded at fold time and require the same token ids). After the switch the release "
        "is pending: the device itself reverts to the previous release unless this flash confirms "
        "the health gate within --commit-deadline, so a flasher killed or cut off at any moment "
        "never leaves an unchecked release live. Uses your ssh and rsync, so ~/.ssh/config and agents work.",
    )
    target = p.add_mutually_exclusive_group(required=True)
    target.add_argument("--host", help="USER@HOST[:PORT] or an ssh config alias")
    target.add_argument(
        "--fleet",
        type=Path,
        help="TOML fleet file: canary first, then the rest, stop at the first failure",
    )
    p.add_argument(
        "--bundle",
        type=Path,
        default=None,
        help="policy or llm bundle directory or .tar (required, except with --reconfigure)",
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
        default=None,
        help="frames: env[:ID_OR_ENTRY_POINT] (a gymnasium id, one of our tasks or "
        "package.module:ClassName; bare env: the env the bundle records), camera[:/dev/videoN], "
        "video:PATH (default: env; with --reconfigure: unchanged)",
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
        default=None,
        help="actions: socket[:PATH], entrypoint:pkg.mod:func, log (default: socket; with "
        "--reconfigure: unchanged)",
    )
    p.add_argument(
        "--rate-hz",
        type=float,
        default=None,
        help="service decisions per second, 0 = unpaced (default: 20; with --reconfigure: "
        "unchanged)",
    )
    p.add_argument(
        "--backend",
        default=None,
        help="encoder backend on the device: auto, ort, es2, es31 or gl33; auto with --profile "
        "takes the profile's GL target when the device has its GL libraries, else ort "
        "(default: auto; with --reconfigure: unchanged)",
    )
    p.add_argument(
        "--reconfigure",
        action="store_true",
        help="change only the device's settings (--server, --backend, --token-file, --source, "
        "--sink, --rate-hz) for its current release, no bundle needed: pending until the health "
        "gate passes, reverted by the device itself otherwise",
    )
    p.add_argument(
        "--token-file",
        type=Path,
        default=None,
        help="the device's bearer token for the policy server (from `splitedge certs`), copied "
        "to <root>/etc/token (default: none, or the one the device has)",
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
        "--commit-deadline",
        type=float,
        default=120.0,
        metavar="SECONDS",
        help="after the switch the release is pending: unless this flash confirms its health "
        "gate within this many seconds, the device reverts to the previous release by itself "
        "(default: %(default)s)",
    )
    p.add_argument(
        "--dry-run",
        action="store_true",
        help="check everything a flash checks before copying, changing nothing: the bundle's "
        "hashes and signature (--public-key), profile, backend and encoder limits here, then "
        "the device's pre-flight over ssh (read-only); print the plan; exit non-zero with the "
        "reason at the first failure",
    )
    p.add_argument(
        "--local-only",
        action="store_true",
        help="with --dry-run: only the checks on this machine, do not contact the device",
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
        source=args.source or "env",
        env_kwargs=env_kwargs(args.env_kwargs),
        env_packages=args.env_package,
        sink=args.sink or "socket",
        service={
            "rate_hz": 20.0 if args.rate_hz is None else args.rate_hz,
            "backend": args.backend or "auto",
        },
        ssh_config=args.ssh_config,
        ssh_options=args.ssh_option,
        device_python=args.device_python,
        bwlimit_kbps=args.bwlimit,
        pip_args=args.pip_arg,
        commit_deadline_s=args.commit_deadline,
    )
    for key, value in (overrides or {}).items():
        setattr(o, key, value)
    return o


def _importable_here(env_packages: list[Path]) -> None:
    """The user's env as the device will import it, for the probe frame made here: the
    working folder (as `python -m` and export do) and every --env-package folder."""
    for path in ["", *(str(p.resolve()) for p in env_packages if p.is_dir())]:
        if path not in sys.path:
            sys.path.insert(0, path)


@os_errors_in_one_line
def run(args: argparse.Namespace) -> int:
    from deploy.flash.dry_run import dry_run
    from deploy.flash.flasher import flash
    from splitedge.errors import SplitedgeError

    def log(line: str) -> None:
        if not args.json:
            print(line, file=sys.stderr, flush=True)

    _importable_here(args.env_package or [])

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
    if args.reconfigure:
        return _reconfigure(args, log)
    if args.bundle is None:
        raise SplitedgeError(
            "flash needs --bundle DIR (or --reconfigure to change only the device's settings)"
        )
    opts = _options(args, args.host)
    if args.token_file is not None:
        raise SplitedgeError(
            "--token-file goes with --reconfigure: flash the bundle, then "
            "`splitedge flash --reconfigure --token-file ...`"
        )
    if args.local_only and not args.dry_run:
        raise SplitedgeError("--local-only goes with --dry-run; drop it to flash")
    if args.dry_run:
        result = dry_run(opts, contact=not args.local_only)
        plan = result["plan"]
        checks = "\n".join(f"  ok  {c['check']:<22} {c['result']}" for c in result["checks"])
        text = "\n".join(f"{i + 1:>2}. {s['step']:<10} {s['command']}" for i, s in enumerate(plan))
        contacted = (
            "the device was asked, read-only" if not args.local_only else "nothing contacted"
        )
        emit(
            result,
            args.json,
            f"dry run for {args.host}: every check passed ({contacted}); nothing was changed\n"
            f"{checks}\nplan:\n{text}"
            + (
                ""
                if "<root>" not in text
                else "\n<root>: the device's $SPLITEDGE_ROOT, else /opt/splitedge"
            ),
        )
        return 0
    log(f"flashing {args.bundle} to {args.host}")
    result = flash(opts, log=log, progress=_progress_bar(args))
    text = table(
        result["steps"],
        title=f"{result['host']}: {result['release']} is current (was {result['previous'] or 'empty'})",
    )
    emit(result, args.json, text)
    return 0


def _reconfigure(args: argparse.Namespace, log: Any) -> int:
    """`flash --reconfigure`: new device settings for the current release, committed or reverted."""
    from deploy.flash.package import parse_sink, parse_source
    from deploy.flash.reconfigure import reconfigure
    from splitedge.errors import SplitedgeError

    if args.bundle or args.fleet or args.dry_run or args.env_package:
        raise SplitedgeError(
            "--reconfigure changes settings only: drop --bundle, --fleet, --dry-run and "
            "--env-package (flash a bundle to change those)"
        )
    changes: dict[str, Any] = {}
    if args.server is not None:
        changes["server"] = args.server
    if args.backend is not None:
        changes["backend"] = args.backend
    if args.source is not None:
        changes["source"] = parse_source(args.source)
    if args.sink is not None:
        changes["sink"] = parse_sink(args.sink)
    if args.rate_hz is not None:
        changes["rate_hz"] = args.rate_hz
    opts = _options(args, args.host)
    log(f"reconfiguring {args.host}")
    result = reconfigure(opts, changes, args.token_file, log)
    text = table(result["steps"], title=f"{result['host']}: {result['release']} reconfigured")
    emit(result, args.json, text)
    return 0


def _progress_bar(args: argparse.Namespace) -> Any:
    """One self-overwriting stderr line of rsync's progress, on a terminal only."""
    if args.json or not sys.stderr.isatty():
        return None
    shown = {"last": ""}

    def show(line: str) -> None:
        size, percent, rate = (line.split() + ["", "", ""])[:3]
        if percent == shown["last"]:
            return
        end = "\n" if percent == "100%" else ""
        print(f"\r  transfer     {percent:>4}  {size} bytes  {rate}   ", end=end,
              file=sys.stderr, flush=True)  # fmt: skip
        shown["last"] = percent

    return show
