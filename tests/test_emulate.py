"""The emulated device: a real sshd; isolation reported honestly, checked against our own probes."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from deploy.emulate.device import EmulatedDevice, _memory_cgroup_parent
from splitedge.errors import SplitedgeError
from tests.conftest import ZOO_BUNDLE

pytestmark = [
    pytest.mark.skipif(
        not (Path("/usr/sbin/sshd").is_file() and shutil.which("ssh")),
        reason="needs openssh-server and openssh-client (apt-get install -y openssh-server)",
    ),
    pytest.mark.timeout(120),
]


def _can_make_netns() -> bool:
    """Our own probe, independent of the emulator: can this process create a network namespace?"""
    if os.geteuid() != 0 or not shutil.which("ip"):
        return False
    name = f"se-probe-{os.getpid()}"
    ok = subprocess.run(["ip", "netns", "add", name], capture_output=True).returncode == 0
    subprocess.run(["ip", "netns", "del", name], capture_output=True)
    return ok


def test_isolation_is_what_the_machine_allows_and_applies_to_ssh_sessions() -> None:
    with EmulatedDevice("pi-zero-2w") as dev:
        print(f"\nemulated device isolation: {dev.caps.describe()}")
        assert dev.caps.netns == _can_make_netns()
        r = dev.ssh(
            "sh",
            "-c",
            'echo "$SPLITEDGE_ROOT $SPLITEDGE_EMULATED_ARCH"; cat /proc/self/cgroup; '
            "cat /proc/net/dev",
        )
        assert r.returncode == 0, r.stderr
        lines = r.stdout.splitlines()
        assert lines[0] == f"{dev.root} aarch64"
        interfaces = {ln.split(":")[0].strip() for ln in lines if ":" in ln and "|" not in ln}
        if dev.caps.netns:
            assert dev.address.startswith("10.213.")
            assert any(i.startswith("sed") for i in interfaces), (
                "the session sees the namespace's veth"
            )
            assert not any(i.startswith("seh") for i in interfaces), "and not the host side"
        else:
            assert dev.address == "127.0.0.1"
        if _memory_cgroup_parent() is not None and os.geteuid() == 0:
            assert dev.caps.cgroup in ("v1", "v2")
            assert f"splitedge-emu-{dev.ident}" in r.stdout, (
                "the ssh session runs inside the memory cgroup"
            )
            limit_file = "memory.max" if dev.caps.cgroup == "v2" else "memory.limit_in_bytes"
            assert dev._cgroup is not None
            assert int((dev._cgroup / limit_file).read_text()) == 512 * 2**20
            # pre-flight, over ssh, sees the limit and stops a flash for a bigger board
            from deploy.flash.flasher import FlashOptions, flash
            from deploy.flash.transport import Target, Transport
            from splitedge.errors import SplitedgeError

            facts = Transport(Target.parse(dev.host), ssh_config=dev.ssh_config).op("facts", None)
            assert facts["ram_limit_mb"] == 512 and facts["arch"] == "aarch64"
            with pytest.raises(
                SplitedgeError,
                match=r"pre-flight failed.*nothing was changed.*ram: device has 512 MB",
            ):
                flash(
                    FlashOptions(
                        host=dev.host,
                        bundle=ZOO_BUNDLE,
                        profile="jetson-nano",
                        server="10.0.0.1:1",
                        ssh_config=dev.ssh_config,
                    )
                )
            assert not any(dev.root.iterdir()), "nothing was written on the device"
        group = dev._cgroup
        netns = dev._netns
    assert group is None or not group.exists(), "cgroup removed"
    if netns:
        assert (
            netns
            not in subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
        )


def test_host_key_is_checked_and_the_plain_loopback_fallback_works(tmp_path: Path) -> None:
    with EmulatedDevice("pi-4b", workdir=tmp_path / "emu", isolate=False) as dev:
        assert dev.caps.describe().startswith("loopback") and dev.address == "127.0.0.1"
        assert dev.ssh("true").returncode == 0
        (dev.workdir / "known_hosts").write_text(
            f"[127.0.0.1]:{dev.port} ssh-ed25519 "
            "AAAAC3NzaC1lZDI1NTE5AAAAIE5yB3v5YV2wQ9Xn6r0bqkG0VQ3mS6x9cF9m4lPp1s2t\n"
        )
        r = dev.ssh("true")
        assert r.returncode == 255 and "verification failed" in r.stderr.lower(), (
            "a wrong host key is refused"
        )
        # the folder is this emulator's: a second one (here or in another process) is refused
        config = dev.ssh_config.read_text()
        with pytest.raises(SplitedgeError, match="belongs to another emulated device"):
            EmulatedDevice("pi-4b", workdir=dev.workdir, isolate=False).start()
        r = subprocess.run(
            [sys.executable, "-m", "splitedge", "device", "emulate", "--workdir",
             str(dev.workdir), "--no-isolation", "--for", "1"],
            capture_output=True, text=True, timeout=60,
        )  # fmt: skip
        assert (
            r.returncode == 2 and f"belongs to a running emulator (pid {os.getpid()})" in r.stderr
        )
        assert dev.ssh_config.read_text() == config, "the running one's files are untouched"
    with EmulatedDevice("pi-4b", workdir=tmp_path / "emu", isolate=False) as dev:
        assert dev.ssh("true").returncode == 0, "a stopped emulator's folder can be used again"


@pytest.mark.skipif(not _can_make_netns(), reason="needs root and ip netns")
def test_a_killed_emulators_namespace_is_reaped_by_the_next_start() -> None:
    from deploy.emulate.device import OWNERS

    dead = subprocess.Popen(["true"])
    dead.wait()  # a pid that no longer runs: the emulator that made the namespace was killed
    ns = f"se-stale{os.getpid() % 10000}"
    subprocess.run(["ip", "netns", "add", ns], check=True)
    OWNERS.mkdir(exist_ok=True)
    (OWNERS / f"{ns}.pid").write_text(str(dead.pid))
    live = f"se-live{os.getpid() % 10000}"  # a namespace whose maker still runs: kept
    subprocess.run(["ip", "netns", "add", live], check=True)
    (OWNERS / f"{live}.pid").write_text(str(os.getpid()))
    try:
        with EmulatedDevice("pi-zero-2w") as dev:
            names = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
            assert ns not in names and not (OWNERS / f"{ns}.pid").exists()
            assert live in names
            assert dev.caps.netns
    finally:
        subprocess.run(["ip", "netns", "del", live], capture_output=True)
        subprocess.run(["ip", "netns", "del", ns], capture_output=True)
        (OWNERS / f"{live}.pid").unlink(missing_ok=True)
