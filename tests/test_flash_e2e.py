"""Flashing an emulated device end to end: real sshd, real rsync, real venv, real policy server.

The tests in this file run in order against one emulated device (module scope):
offline flash of the shipped bundle, a second version, rollback; then interrupted
transfers, refused bundles and a failing health gate, each checked on the device's
file system (the emulated device shares this machine's), never through the code
under test alone.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import random
import shutil
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from splitedge.bundle import write_manifest
from splitedge.cli import main
from splitedge.errors import SplitedgeError
from tests.conftest import ZOO_BUNDLE

NAME = "cartpole-ppo"
V1, V2, V3 = f"{NAME}-1.0.0", f"{NAME}-1.0.1", f"{NAME}-1.0.2"

needs_ssh = pytest.mark.skipif(
    not (Path("/usr/sbin/sshd").is_file() and shutil.which("rsync") and shutil.which("ssh")),
    reason="needs openssh-server, openssh-client and rsync (apt-get install -y openssh-server rsync)",
)
# slow end to end (`make test-slow`): flashes an emulated device (sshd, rsync, venv)
pytestmark = [needs_ssh, pytest.mark.slow, pytest.mark.timeout(300)]


def _sha(p: Path) -> str:
    return hashlib.sha256(p.read_bytes()).hexdigest()


def _version(tmp: Path, version: str, padding_kb: int = 0) -> Path:
    """The shipped bundle re-versioned (and optionally padded so a transfer takes a while)."""
    out = tmp / version
    shutil.copytree(ZOO_BUNDLE, out)
    manifest = json.loads((out / "manifest.json").read_text())
    manifest.pop("format")
    manifest.pop("files")
    manifest["version"] = version
    if padding_kb:
        (out / "padding.bin").write_bytes(random.Random(0).randbytes(padding_kb * 1024))
    write_manifest(out, manifest)
    return out


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict]:
    from deploy.emulate.device import EmulatedDevice
    from deploy.server_process import ServerProcess

    tmp = tmp_path_factory.mktemp("flash")
    # a cache of our own: test runs beside this one must not rewrite the wheelhouse under it
    saved, os.environ["SPLITEDGE_CACHE"] = os.environ.get("SPLITEDGE_CACHE"), str(tmp / "cache")
    dev = EmulatedDevice("pi-zero-2w")
    server = ServerProcess(ZOO_BUNDLE, extra_args=["--host", "0.0.0.0", "--grace-s", "0.5"])
    try:
        with server, dev:  # the device stops first, so its service never sees the server go away
            print(f"\nemulated device: {dev.caps.describe()}")
            yield {
                "dev": dev,
                "server": f"{dev.host_address}:{server.port}",
                "tmp": tmp,
                "v1": ZOO_BUNDLE,
                "v2": _version(tmp, "1.0.1"),
                "v3": _version(tmp, "1.0.2", padding_kb=384),
            }
    finally:
        if saved is None:
            os.environ.pop("SPLITEDGE_CACHE", None)
        else:
            os.environ["SPLITEDGE_CACHE"] = saved


def _cli(env: dict, *args: str) -> tuple[int, dict]:
    """Run the CLI in this process with --json; return its exit status and parsed output."""
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        rc = main([*args, "--ssh-config", str(env["dev"].ssh_config), "--json"])
    text = buf.getvalue()
    return rc, (json.loads(text) if text.strip() else {})


def _flash_args(env: dict, bundle: Path, *extra: str) -> list[str]:
    return [
        "flash",
        "--host",
        env["dev"].host,
        "--bundle",
        str(bundle),
        "--profile",
        "pi-zero-2w",
        "--server",
        env["server"],
        "--offline",
        "--rate-hz",
        "5",
        *extra,
    ]


def _current(root: Path) -> str | None:
    return os.readlink(root / "current").split("/")[-1] if (root / "current").is_symlink() else None


def _previous(root: Path) -> str | None:
    return (
        os.readlink(root / "previous").split("/")[-1] if (root / "previous").is_symlink() else None
    )


def _assert_release_intact(root: Path, release: str, source: Path) -> None:
    for f in source.iterdir():
        assert _sha(root / "releases" / release / "bundle" / f.name) == _sha(f), (
            f"{release}/{f.name} changed"
        )


def _supervisor_alive(root: Path) -> int:
    pid = int((root / "run" / "supervisor.pid").read_text())
    assert b"supervise" in Path(f"/proc/{pid}/cmdline").read_bytes(), (
        "the service supervisor is not running"
    )
    return pid


def test_offline_flash_second_version_and_rollback(env: dict) -> None:
    root: Path = env["dev"].root
    rc, r = _cli(env, *_flash_args(env, env["v1"]))
    assert rc == 0 and r["release"] == V1
    assert _current(root) == V1 and _previous(root) is None
    _assert_release_intact(root, V1, ZOO_BUNDLE)
    runtime = (root / "releases" / V1 / "runtime").resolve()
    site = next(runtime.glob("venv/lib/python3*/site-packages"))
    assert (site / "onnxruntime").is_dir() and (site / "edge").is_dir()
    assert not (site / "torch").exists() and not (site / "models").exists(), (
        "no torch or models on a device"
    )
    wheels = {p.name.split("-")[0] for p in (root / "wheelhouse").glob("*.whl")}
    assert {"onnxruntime", "grpcio", "numpy", "splitedge"} <= wheels, (
        "offline: every wheel travelled"
    )
    health = json.loads((root / "state" / "health.json").read_text())
    assert health["ok"] and health["release"] == V1 and health["encoder"]["max_diff_lsb"] <= 2
    assert health["round_trip"]["ok"] and health["round_trip"]["action"] in (0, 1)
    _supervisor_alive(root)

    rc, s = _cli(env, "status", "--host", env["dev"].host)
    assert (
        rc == 0
        and s["current"] == V1
        and s["last_health"]["ok"]
        and s["service"]["active"] == "active"
    )

    rc, r2 = _cli(env, *_flash_args(env, env["v2"]))
    assert rc == 0 and _current(root) == V2 and _previous(root) == V1
    if r2["wheel"] == r["wheel"]:  # (edge/ edited meanwhile makes a new runtime, rightly)
        assert (root / "releases" / V2 / "runtime").resolve() == runtime, (
            "same runtime reused, not reinstalled"
        )
    assert json.loads((root / "state" / "health.json").read_text())["release"] == V2

    rc, r = _cli(env, "rollback", "--host", env["dev"].host)
    assert rc == 0 and r["health"]["ok"]
    assert _current(root) == V1 and _previous(root) == V2
    _assert_release_intact(root, V1, ZOO_BUNDLE)
    events = [
        json.loads(line) for line in (root / "state" / "history.jsonl").read_text().splitlines()
    ]
    assert [(e["event"], e["to"]) for e in events] == [
        ("flash", V1),
        ("flash", V2),
        ("rollback", V1),
    ]


def _staged_release(env: dict, bundle: Path, out: Path) -> None:
    from deploy.flash.package import parse_sink, parse_source, stage_release
    from splitedge.bundle import load_bundle

    stage_release(
        load_bundle(bundle),
        out,
        str(env["dev"].root),
        env["server"],
        parse_source("env"),
        parse_sink("socket"),
    )


def _wait_for_bytes(folder: Path, limit_s: float = 60.0) -> None:
    """Poll until some file under folder has bytes in it, or limit_s passes."""
    end = time.monotonic() + limit_s
    while time.monotonic() < end:
        try:
            if any(p.is_file() and p.stat().st_size for p in folder.rglob("*")):
                return
        except OSError:  # rsync renamed or removed a file as we looked
            pass
        time.sleep(0.01)


def test_killed_transfers_leave_the_previous_release_active_and_healthy(env: dict) -> None:
    from deploy.flash.flasher import health_of_current
    from deploy.flash.transport import Target, Transport

    dev, root = env["dev"], env["dev"].root
    t = Transport(Target.parse(dev.host), ssh_config=dev.ssh_config)
    assert _current(root) == V1
    service_pid = _supervisor_alive(root)
    staging = env["tmp"] / "staging" / V3
    _staged_release(env, env["v3"], staging)
    t.op("prepare", str(root), release=V3)
    rng = random.Random(1234)
    kill_points: list[float] = []
    partial_sizes = []
    while len(kill_points) < 10:
        delay = rng.uniform(0.05, 1.5)  # a whole copy takes ~3 s at 128 KiB/s
        proc = subprocess.Popen(
            t.rsync_argv(staging, f"{root}/incoming/{V3}", bwlimit_kbps=128),
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )
        if not kill_points:  # the first kill waits for bytes to arrive: a loaded machine may
            _wait_for_bytes(root / "incoming" / V3)  # take longer than any delay to start rsync
        time.sleep(delay)
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        if proc.returncode == 0:  # resumed copies add up: it finished before this kill, start over
            shutil.rmtree(root / "incoming" / V3)
            continue
        kill_points.append(delay)
        assert _current(root) == V1 and _previous(root) == V2
        assert not (root / "releases" / V3).exists()
        _assert_release_intact(root, V1, ZOO_BUNDLE)
        assert _supervisor_alive(root) == service_pid, "the running service was never touched"
        partial_sizes.append(
            sum(p.stat().st_size for p in (root / "incoming" / V3).rglob("*") if p.is_file())
        )
    print(f"killed at {[round(d, 2) for d in kill_points]} s; bytes on the device {partial_sizes}")
    assert max(partial_sizes) > 0, "some bytes arrived before the kills (resumable partial files)"
    # a half-transferred release is refused by the device's hash check (a kill that came after the
    # last byte, during rsync's goodbye, leaves a complete copy, which may rightly be accepted)
    full = sum(p.stat().st_size for p in staging.rglob("*") if p.is_file())
    if partial_sizes[-1] < full:
        with pytest.raises(SplitedgeError, match="transfer incomplete|hash check"):
            t.op("stage", str(root), release=V3)
    health = health_of_current(t, str(root))
    assert health["ok"] and health["release"] == V1

    # the whole flash process killed at a random point, too: whatever is current must be healthy
    argv = ["python", "-m", "splitedge", *_flash_args(env, env["v3"], "--bwlimit", "128")]
    proc = subprocess.Popen(
        argv + ["--ssh-config", str(dev.ssh_config)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    time.sleep(rng.uniform(1.0, 5.0))
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert _current(root) in (V1, V3)
    assert health_of_current(t, str(root))["ok"]
    if _current(root) == V3:  # the kill came after the switch; put V1 back for the next tests
        t.op("rollback", str(root), restore_previous=V2)
    # an uninterrupted copy resumes from the partial files and the device then accepts it
    t.copy(staging, f"{root}/incoming/{V3}")
    assert t.op("stage", str(root), release=V3)["ok"]
    _assert_release_intact(root, V3, env["v3"])
    assert _current(root) == V1 and _previous(root) == V2


def test_corrupted_or_badly_signed_bundles_are_refused(env: dict) -> None:
    from deploy.flash.transport import DeviceRefused, Target, Transport
    from splitedge.signing import generate_keypair, sign_bundle

    dev, root, tmp = env["dev"], env["dev"].root, env["tmp"]
    before = (
        _current(root),
        _previous(root),
        sorted(p.name for p in (root / "releases").iterdir()),
    )
    bad = tmp / "corrupt"
    shutil.copytree(env["v3"], bad)
    with open(bad / "head.onnx", "r+b") as f:
        f.seek(200)
        f.write(b"\x13\x37")
    assert main(_flash_args(env, bad) + ["--ssh-config", str(dev.ssh_config)]) == 2

    # corruption that happens after the copy is caught by the device's own hash check
    t = Transport(Target.parse(dev.host), ssh_config=dev.ssh_config)
    rel = "cartpole-ppo-9.9.9"
    staging = tmp / "staging" / rel
    _staged_release(env, env["v3"], staging)
    t.op("prepare", str(root), release=rel)
    t.copy(staging, f"{root}/incoming/{rel}")
    with open(root / "incoming" / rel / "bundle" / "encoder.onnx", "r+b") as f:
        f.seek(300)
        f.write(b"\xff\x00\xff")
    with pytest.raises(DeviceRefused, match="encoder.onnx: sha256 does not match"):
        t.op("stage", str(root), release=rel)

    # signatures: a key the bundle was not signed with is refused here, and on the device
    signed = _version(tmp, "1.0.3")
    generate_keypair(tmp / "a.key", tmp / "a.pub")
    generate_keypair(tmp / "b.key", tmp / "b.pub")
    sign_bundle(signed, tmp / "b.key")
    assert (
        main(
            _flash_args(env, signed, "--public-key", str(tmp / "a.pub"))
            + ["--ssh-config", str(dev.ssh_config)]
        )
        == 2
    )
    t.op("trust-key", str(root), key=(tmp / "a.pub").read_text().strip())
    try:
        with pytest.raises(SplitedgeError, match="signature does not match.*nothing was switched"):
            from deploy.flash.flasher import FlashOptions, flash

            flash(
                FlashOptions(
                    host=dev.host,
                    bundle=signed,
                    profile="pi-zero-2w",
                    server=env["server"],
                    offline=True,
                    ssh_config=dev.ssh_config,
                )
            )
    finally:
        (root / "etc" / "signing.pub").unlink()
    after = (_current(root), _previous(root), sorted(p.name for p in (root / "releases").iterdir()))
    assert after == before, "a refused bundle changes nothing"
    _assert_release_intact(root, V1, ZOO_BUNDLE)


def test_failing_health_gate_rolls_back_automatically(env: dict) -> None:
    from deploy.server_process import free_port

    dev, root = env["dev"], env["dev"].root
    assert _current(root) == V1 and _previous(root) == V2
    bad_release = _version(env["tmp"], "1.0.4")
    unreachable = f"{dev.host_address}:{free_port()}"
    argv = [
        "flash",
        "--host",
        dev.host,
        "--bundle",
        str(bad_release),
        "--profile",
        "pi-zero-2w",
        "--server",
        unreachable,
        "--offline",
        "--ssh-config",
        str(dev.ssh_config),
    ]
    with pytest.raises(
        SplitedgeError, match=f"health gate failed.*Rolled back automatically: current is {V1}"
    ):
        from deploy.flash.flasher import FlashOptions, flash

        flash(
            FlashOptions(
                host=dev.host,
                bundle=bad_release,
                profile="pi-zero-2w",
                server=unreachable,
                offline=True,
                ssh_config=dev.ssh_config,
            )
        )
    del argv
    assert _current(root) == V1 and _previous(root) == V2, (
        "previous restored: a later rollback skips the bad one"
    )
    events = [
        json.loads(line) for line in (root / "state" / "history.jsonl").read_text().splitlines()
    ]
    assert [(e["event"], e["to"]) for e in events[-2:]] == [
        ("flash", f"{NAME}-1.0.4"),
        ("rollback", V1),
    ]
    health = json.loads((root / "state" / "health.json").read_text())
    assert health["ok"] and health["release"] == V1, (
        "the restored release was checked and is healthy"
    )
    _supervisor_alive(root)


CAM_ENV = '''"""A user's env, outside splitedge: 3x48x48 frames of a bar the actions move."""

import gymnasium as gym
import numpy as np


class Cam(gym.Env):
    def __init__(self):
        self.observation_space = gym.spaces.Box(0, 255, (3, 48, 48), np.uint8)
        self.action_space = gym.spaces.Discrete(2)

    def _obs(self):
        img = np.zeros((3, 48, 48), np.uint8)
        img[:, :, self.x] = 255
        return img

    def reset(self, *, seed=None, options=None):
        super().reset(seed=seed)
        self.x = int(self.np_random.integers(48))
        return self._obs(), {}

    def step(self, action):
        self.x = (self.x + (1 if action else -1)) % 48
        return self._obs(), 0.0, False, False, {}
'''


def _user_env_version(tmp: Path, version: str) -> Path:
    """The shipped bundle re-versioned, recording a user's env (cam_env:Cam, same frame shape)
    that exists only in the user's folder: the device gets it from --env-package or not at all."""
    out = _version(tmp, version)
    manifest = json.loads((out / "manifest.json").read_text())
    manifest.pop("format")
    manifest.pop("files")
    manifest["policy"].update(task=None, env={"id": "cam_env:Cam", "kwargs": {}})
    write_manifest(out, manifest)
    return out


def test_the_users_env_package_travels_with_its_release(env: dict) -> None:
    from deploy.flash.flasher import FlashOptions, flash

    dev, root = env["dev"], env["dev"].root
    project = env["tmp"] / "user-project"
    project.mkdir()
    (project / "cam_env.py").write_text(CAM_ENV)
    (project / "train.py").write_text("import torch\n")  # the user's other scripts stay home
    good, v7 = _user_env_version(env["tmp"], "1.0.7"), f"{NAME}-1.0.7"
    rc, r = _cli(env, *_flash_args(env, good, "--env-package", str(project)))
    assert rc == 0 and _current(root) == v7, r
    packages = root / "releases" / v7 / "packages"
    assert (packages / "cam_env.py").read_text() == CAM_ENV and not (packages / "train.py").exists()
    health = json.loads((root / "state" / "health.json").read_text())
    assert health["ok"] and health["source"] == {"ok": True, "name": "env:cam_env:Cam"}
    state: dict = {}
    for _ in range(100):  # the restarted service runs the user's env closed loop
        with contextlib.suppress(OSError, ValueError):
            state = json.loads((root / "state" / "service.json").read_text())
        if state.get("source") == "env:cam_env:Cam" and state.get("steps", 0) > 0:
            break
        time.sleep(0.2)
    assert state.get("source") == "env:cam_env:Cam" and state["steps"] > 0, state

    # the same env without its package: the gate cannot start the source, and rolls back
    bare = _user_env_version(env["tmp"], "1.0.8")
    opts = FlashOptions(host=dev.host, bundle=bare, profile="pi-zero-2w", server=env["server"],
                        offline=True, ssh_config=dev.ssh_config)  # fmt: skip
    with pytest.raises(SplitedgeError, match=f"cannot import 'cam_env'.*current is {v7}"):
        flash(opts)
    assert _current(root) == v7 and (packages / "cam_env.py").is_file()
