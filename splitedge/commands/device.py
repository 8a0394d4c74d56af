"""`splitedge device emulate`: a local emulated device (real sshd) to flash to."""

from __future__ import annotations

import argparse
import signal
import time
from pathlib import Path

from splitedge.errors import os_errors_in_one_line
from splitedge.output import emit, table


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("device", help="emulated devices for trying flash without hardware")
    dsub = p.add_subparsers(dest="device_command", metavar="ACTION", required=True)
    e = dsub.add_parser(
        "emulate",
        help="run an emulated device (sshd on loopback/netns) until Ctrl-C",
        description="Start a real OpenSSH sshd with a throwaway key, in its own network "
        "namespace and with the profile's RAM as a cgroup memory limit where root "
        "allows (it says which). Prints the flash command to use. Needs openssh-server "
        "and rsync (apt-get install -y openssh-server rsync). With --arch arm64 every ssh "
        "session runs a Debian bookworm arm64 userland under qemu-user-static (built once "
        "into the splitedge cache; needs root and apt-get install -y qemu-user-static "
        "mmdebstrap arch-test).",
    )
    e.add_argument("--profile", default="pi-zero-2w", help="device profile (default: %(default)s)")
    e.add_argument(
        "--workdir", type=Path, default=None, help="keep keys, config and the device's files here"
    )
    e.add_argument("--name", default=None, help="ssh alias (default: PROFILE-emu)")
    e.add_argument(
        "--arch",
        choices=("native", "arm64"),
        default="native",
        help="native: this machine's userland, reporting the profile's architecture; arm64: a "
        "real aarch64 Debian userland under qemu (default: %(default)s)",
    )
    e.add_argument(
        "--memory-mb",
        type=int,
        default=None,
        help="the device's cgroup memory limit (default: the profile's RAM); under --arch arm64 "
        "qemu's own memory counts against it, and a pi-zero-2w's 512 MB is too little there",
    )
    e.add_argument(
        "--no-isolation", action="store_true", help="plain loopback sshd: no namespace, no cgroup"
    )
    e.add_argument(
        "--for",
        dest="seconds",
        type=float,
        default=0,
        help="stop after this many seconds; 0 runs until Ctrl-C (default: %(default)s)",
    )
    e.add_argument(
        "--json", action="store_true", help="print the result as JSON instead of a table"
    )
    e.set_defaults(func=emulate)


@os_errors_in_one_line
def emulate(args: argparse.Namespace) -> int:
    from deploy.emulate.device import EmulatedDevice

    dev = EmulatedDevice(
        args.profile,
        workdir=args.workdir,
        isolate=not args.no_isolation,
        name=args.name,
        arch=args.arch,
        memory_mb=args.memory_mb,
    )
    signal.signal(signal.SIGTERM, lambda *_: (_ for _ in ()).throw(KeyboardInterrupt()))
    with dev:
        info = dev.describe()
        info["flash"] = (
            f"splitedge flash --host {dev.host} --ssh-config {dev.ssh_config} --profile {args.profile} "
            f"--bundle models/zoo/cartpole-ppo --offline --server {dev.host_address}:50051"
        )
        info["serve"] = (
            "splitedge serve --bundle models/zoo/cartpole-ppo --host "
            f"{'0.0.0.0' if dev.caps.netns else '127.0.0.1'} --port 50051"
        )
        rows = [{"field": k, "value": v} for k, v in info.items()]
        emit(
            info, args.json, table(rows, title=f"emulated {args.profile} running (Ctrl-C stops it)")
        )
        try:
            end = time.monotonic() + args.seconds if args.seconds > 0 else float("inf")
            while time.monotonic() < end:
                time.sleep(0.2)
        except KeyboardInterrupt:
            pass
    return 0
