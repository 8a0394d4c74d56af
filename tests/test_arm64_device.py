"""The emulated Raspberry Pi that is really arm64: a Debian arm64 userland under qemu-user.

The heavy test builds (or reuses) the cached root file system, flashes the shipped
bundle offline with --backend es2 (Mesa llvmpipe inside the arm64 userland), checks
on the device's files that what was installed is aarch64 code (ELF headers read
here, not the device's word), that `status` says aarch64, runs an episode with
`edge run --backend es2` inside the device and the same one on this x86_64 machine
(the same actions, step for step), and rolls back. It runs in CI: a warm rootfs
cache is reused, a cold one is built first (about 8 minutes). The
light tests check that a missing qemu or binfmt_misc stops the emulator with one
line that names the fix.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import shutil
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from deploy.emulate import binfmt
from deploy.emulate.arm64 import cpuinfo
from deploy.emulate.rootfs import PACKAGES, built, rootfs_path
from splitedge.cli import main
from splitedge.errors import SplitedgeError
from tests.bundles import reversioned
from tests.conftest import ZOO_BUNDLE

NAME = "cartpole-ppo"
V1, V2 = f"{NAME}-1.0.0", f"{NAME}-1.0.1"
EM_AARCH64 = 183  # ELF e_machine of aarch64 (x86_64 is 62)


def _elf_machine(path: Path) -> int:
    """e_machine of an ELF file, read from its header (bytes 18-19, little endian)."""
    head = path.read_bytes()[:20]
    assert head[:4] == b"\x7fELF", f"{path} is not an ELF file"
    return int.from_bytes(head[18:20], "little")


def _tools_ready() -> str | None:
    have_ssh = Path("/usr/sbin/sshd").is_file() and shutil.which("rsync") and shutil.which("ssh")
    if not have_ssh:
        return "needs openssh-server, openssh-client and rsync"
    return binfmt.tools_problem(need_builder=not built(rootfs_path()))


# -- one clear line when qemu or binfmt_misc is missing -------------------------------------
# (the emulator checks for sshd and rsync first, as the x86_64 one does)
needs_ssh = pytest.mark.skipif(
    not (Path("/usr/sbin/sshd").is_file() and shutil.which("rsync")),
    reason="needs openssh-server and rsync (apt-get install -y openssh-server rsync)",
)


def _emulate_line(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> tuple[int, str]:
    rc = main(["device", "emulate", "--arch", "arm64", "--workdir", str(tmp_path), "--for", "1"])
    err = capsys.readouterr().err.strip()
    return rc, err


@needs_ssh
def test_missing_qemu_is_one_line_with_the_apt_command(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    monkeypatch.setattr(binfmt, "QEMU", str(tmp_path / "no-qemu-aarch64-static"))
    rc, err = _emulate_line(capsys, tmp_path / "emu")
    assert rc != 0
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    assert "apt-get install -y qemu-user-static" in err


@needs_ssh
def test_missing_binfmt_misc_is_one_line(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    if os.geteuid() != 0:
        pytest.skip("the binfmt check comes after the root check")
    fake_qemu = tmp_path / "qemu-aarch64-static"
    fake_qemu.write_bytes(b"")
    no_fs = tmp_path / "filesystems"
    no_fs.write_text("nodev\tproc\nnodev\ttmpfs\n")
    monkeypatch.setattr(binfmt, "QEMU", str(fake_qemu))
    monkeypatch.setattr(binfmt, "BINFMT", tmp_path / "binfmt_misc")  # not mounted
    monkeypatch.setattr(binfmt, "FILESYSTEMS", no_fs)  # and the kernel lacks it
    rc, err = _emulate_line(capsys, tmp_path / "emu")
    assert rc != 0
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    assert "binfmt_misc" in err and "modprobe binfmt_misc" in err


def test_x86_64_emulator_is_unchanged_by_default() -> None:
    from deploy.emulate.device import EmulatedDevice

    dev = EmulatedDevice("pi-zero-2w")
    assert dev.arm64 is None
    with pytest.raises(SplitedgeError, match="unknown --arch"):
        EmulatedDevice("pi-zero-2w", arch="mips")
    dev.cleanup()


def test_rootfs_cache_is_keyed_by_suite_and_packages(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("SPLITEDGE_CACHE", str(tmp_path))
    base = rootfs_path()
    assert base.parent == tmp_path / "rootfs" and base.name.startswith("bookworm-arm64-")
    assert rootfs_path(packages=("python3", "rsync")) != base
    assert rootfs_path(suite="trixie") != base
    assert rootfs_path(packages=tuple(reversed(PACKAGES))) == base, "order does not matter"
    assert built(base) is None, "nothing built there: an empty cache is not a root file system"


def test_only_an_enabled_fix_binary_aarch64_handler_counts(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    table = tmp_path / "binfmt_misc"
    table.mkdir()
    (table / "register").write_text("")
    (table / "status").write_text("enabled\n")
    entry = "{state}\ninterpreter /usr/bin/qemu-aarch64-static\nflags: {flags}\noffset 0\n"
    entry += f"magic {binfmt.MAGIC.hex()}\nmask {binfmt.MASK.hex()}\n"
    monkeypatch.setattr(binfmt, "BINFMT", table)
    (table / "qemu-aarch64").write_text(entry.format(state="enabled", flags="OCP"))
    assert binfmt.aarch64_handler() is None, "without F the chroot would need its own qemu"
    (table / "other").write_text(entry.format(state="disabled", flags="F"))
    assert binfmt.aarch64_handler() is None
    (table / "ours").write_text(entry.format(state="enabled", flags="F"))
    assert binfmt.aarch64_handler() == "ours"


@pytest.mark.parametrize(("profile", "part"), [("pi-zero-2w", "0xd03"), ("pi-4b", "0xd08")])
def test_device_cpuinfo_names_the_profiles_arm_core(profile: str, part: str) -> None:
    entries = [e for e in cpuinfo(profile).split("\n\n") if e.strip()]
    assert len(entries) == len(os.sched_getaffinity(0))
    for n, e in enumerate(entries):
        fields = dict(line.split(":", 1) for line in e.splitlines())
        fields = {k.strip(): v.strip() for k, v in fields.items()}
        assert fields["processor"] == str(n) and fields["CPU implementer"] == "0x41"
        assert fields["CPU part"] == part and fields["CPU architecture"] == "8"


# -- the real thing ------------------------------------------------------------------------
def _cli(dev: object, *args: str) -> tuple[int, dict]:
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        rc = main([*args, "--ssh-config", str(dev.ssh_config), "--json"])  # type: ignore[attr-defined]
    text = buf.getvalue()
    return rc, (json.loads(text) if text.strip() else {})


def _cli_plain(*args: str) -> tuple[int, dict]:
    """A command run on this machine (no device, no ssh config)."""
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        rc = main(list(args))
    return rc, json.loads(buf.getvalue())


def _current(root: Path) -> str | None:
    return os.readlink(root / "current").split("/")[-1] if (root / "current").is_symlink() else None


@pytest.fixture(scope="module")
def arm64(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict]:
    from deploy.emulate.device import EmulatedDevice
    from deploy.emulate.rootfs import ensure_rootfs
    from deploy.server_process import ServerProcess

    why = _tools_ready()
    if why:
        pytest.skip(why)
    tmp = tmp_path_factory.mktemp("arm64")
    t0 = time.monotonic()
    rootfs = ensure_rootfs()  # the shared cache: built once, reused by every later run
    print(f"\narm64 rootfs {rootfs} ready in {time.monotonic() - t0:.1f} s")
    # the aarch64 wheels go to the shared splitedge cache, as the rootfs does: only this test
    # downloads for aarch64, and a warm cache is what a user's second flash sees
    dev = EmulatedDevice("pi-4b", arch="arm64", rootfs=rootfs)
    server = ServerProcess(ZOO_BUNDLE, extra_args=["--host", "0.0.0.0", "--grace-s", "0.5"])
    with server, dev:
        print(f"emulated arm64 device: {dev.caps.describe()}; {dev.describe()['binfmt']}")
        yield {
            "dev": dev,
            "server": f"{dev.host_address}:{server.port}",
            "local_server": server.address,
            "tmp": tmp,
        }
    others = binfmt.OWNERS.read_text().split() if binfmt.OWNERS.is_file() else []
    others = [p for p in others if Path(f"/proc/{p}").exists()]  # arm64 emulators beside us
    if "registered as" in dev.describe()["binfmt"] and not others:
        assert not (binfmt.BINFMT / binfmt.NAME).exists(), "our binfmt entry is undone"


@pytest.mark.timeout(1800)
def test_arm64_device_flash_health_status_rollback(arm64: dict) -> None:
    dev = arm64["dev"]
    root: Path = dev.root
    r = dev.ssh(
        "sh", "-c", 'uname -m; python3 -c "import sys; print(sys.implementation.cache_tag)"'
    )
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == ["aarch64", "cpython-311"], r.stdout

    flash = [
        "flash",
        "--host",
        dev.host,
        "--profile",
        "pi-4b",
        "--server",
        arm64["server"],
        "--offline",
        "--rate-hz",
        "2",
    ]
    t0 = time.monotonic()
    rc, r1 = _cli(dev, *flash, "--backend", "es2", "--bundle", str(ZOO_BUNDLE))
    print(f"first flash on arm64: {time.monotonic() - t0:.1f} s")
    assert rc == 0 and r1["release"] == V1, r1
    assert _current(root) == V1
    preflight = next(row["result"] for row in r1["steps"] if row["step"] == "pre-flight")
    assert preflight.startswith("aarch64, Python 3.11") and "cpython-311-aarch64" in preflight

    # what the device runs is aarch64 code: read the ELF headers here, not the device's word
    wheels = {p.name for p in (root / "wheelhouse").glob("*.whl")}
    for pkg in ("onnxruntime", "grpcio", "numpy", "cryptography"):
        assert any(w.startswith(pkg + "-") and "aarch64" in w for w in wheels), (pkg, wheels)
    assert any(w.lower().startswith("pyopengl-") for w in wheels)
    runtime = (root / "releases" / V1 / "runtime").resolve()
    site = next(runtime.glob("venv/lib/python3.11/site-packages"))
    ort = next((site / "onnxruntime" / "capi").glob("onnxruntime_pybind11_state*.so"))
    assert _elf_machine(ort) == EM_AARCH64

    health = json.loads((root / "state" / "health.json").read_text())
    assert health["ok"] and health["release"] == V1, health
    assert (
        health["encoder"]["backend"].startswith("es2: ")
        and "llvmpipe" in (health["encoder"]["backend"])
    )
    assert health["encoder"]["max_diff_lsb"] <= 2
    assert health["round_trip"]["ok"] and health["round_trip"]["action"] in (0, 1)

    rc, s = _cli(dev, "status", "--host", dev.host)
    assert rc == 0 and s["machine"] == "aarch64" and s["arch"] == "aarch64", s
    assert s["current"] == V1 and s["last_health"]["ok"]

    # an episode with the es2 encoder inside the device (aarch64 Python, aarch64 Mesa under
    # qemu) against the host's server, and the same episode here on x86_64: the same frames
    # give the same features, so the same actions, step for step (one differing action would
    # change every frame after it)
    run = ["edge", "run", "--backend", "es2", "--steps", "500", "--seed", "3", "--json"]
    t0 = time.monotonic()
    r = dev.ssh(
        "sh",
        "-c",
        '"$SPLITEDGE_ROOT/current/runtime/venv/bin/python" -m splitedge '
        + " ".join(run)
        + f' --bundle "$SPLITEDGE_ROOT/current/bundle" --server {arm64["server"]}',
    )
    assert r.returncode == 0, r.stderr[-2000:]
    on_arm = json.loads(r.stdout)
    print(f"edge run on arm64: {time.monotonic() - t0:.1f} s, {on_arm['encoder_backend']}")
    rc, on_x86 = _cli_plain(*run, "--bundle", str(ZOO_BUNDLE), "--server", arm64["local_server"])
    assert rc == 0, on_x86
    assert on_arm["encoder_backend"].startswith("es2") and on_x86["encoder_backend"].startswith(
        "es2"
    )
    assert on_arm["episodes"] >= 1 and on_arm["fallbacks"] == 0 == on_x86["fallbacks"], on_arm
    assert on_arm["actions_sha256"] == on_x86["actions_sha256"], (on_arm, on_x86)
    assert on_arm["mean_return"] == on_x86["mean_return"]

    # the second version's gate probes onnxruntime, aarch64 build under qemu (it needs the
    # emulator's aarch64 /proc/cpuinfo: with the host's it segfaults at import)
    v2 = str(reversioned(arm64["tmp"], "1.0.1"))
    rc, r2 = _cli(dev, *flash, "--backend", "ort", "--bundle", v2)
    assert rc == 0 and _current(root) == V2, r2
    assert r2["health"]["encoder"]["backend"].startswith("ort"), r2["health"]
    rc, r = _cli(dev, "rollback", "--host", dev.host)
    assert rc == 0, r
    assert _current(root) == V1


@pytest.mark.slow
@pytest.mark.timeout(1800)
def test_a_fleet_of_one_x86_64_and_one_arm64_device_flashes_canary_first(
    arm64: dict, tmp_path: Path
) -> None:
    """A fleet file naming an x86_64 Pi (the canary) and the arm64 one: each gets wheels for
    its own architecture, each passes its health gate, the canary first."""
    from deploy.emulate.device import EmulatedDevice

    arm = arm64["dev"]
    port = arm64["server"].rsplit(":", 1)[1]
    v3 = str(reversioned(tmp_path, "1.0.2"))
    with EmulatedDevice("pi-zero-2w") as x86:
        fleet = tmp_path / "fleet.toml"
        fleet.write_text(
            "[defaults]\noffline = true\n"
            f'[[device]]\nhost = "{arm.host}"\nprofile = "pi-4b"\n'
            f'server = "{arm.host_address}:{port}"\nssh_config = "{arm.ssh_config}"\n'
            f'[[device]]\nhost = "{x86.host}"\ncanary = true\nprofile = "pi-zero-2w"\n'
            f'server = "{x86.host_address}:{port}"\nssh_config = "{x86.ssh_config}"\n'
        )
        buf = io.StringIO()
        t0 = time.monotonic()
        with contextlib.redirect_stdout(buf):
            rc = main(
                ["flash", "--fleet", str(fleet), "--bundle", v3, "--backend", "es2", "--json"]
            )
        print(f"fleet flash, x86_64 canary then arm64: {time.monotonic() - t0:.1f} s")
        out = json.loads(buf.getvalue())
        assert rc == 0, out
        rows = out["devices"]
        assert [r["host"] for r in rows] == [x86.host, arm.host], rows
        assert [r["result"] for r in rows] == ["ok", "ok"], rows
        for dev, machine in ((x86, "x86_64"), (arm, "aarch64")):
            assert _current(dev.root) == f"{NAME}-1.0.2"
            health = json.loads((dev.root / "state" / "health.json").read_text())
            assert health["ok"] and health["encoder"]["backend"].startswith("es2"), health
            wheels = [p.name for p in (dev.root / "wheelhouse").glob("onnxruntime-*.whl")]
            assert wheels and all(machine in w for w in wheels), (machine, wheels)
