"""Flash planning without a device: targets, argv building, pre-flight rules, device-side ops, fleets."""

from __future__ import annotations

import json
import os
import shlex
import shutil
import subprocess
from pathlib import Path

import pytest

from deploy.flash import preflight, remote
from deploy.flash.fleet import FleetDevice, flash_fleet, load_fleet
from deploy.flash.transport import Target, Transport
from splitedge.errors import SplitedgeError
from tests.conftest import ZOO_BUNDLE


@pytest.mark.parametrize(
    ("text", "user", "host", "port"),
    [
        ("pi@raspberrypi.local", "pi", "raspberrypi.local", None),
        ("pi@10.0.0.7:2222", "pi", "10.0.0.7", 2222),
        ("cam-1", None, "cam-1", None),
        ("root@[fe80::1]:22", "root", "fe80::1", 22),
    ],
)
def test_targets_parse(text: str, user: str | None, host: str, port: int | None) -> None:
    t = Target.parse(text)
    assert (t.user, t.host, t.port) == (user, host, port)


@pytest.mark.parametrize("bad", ["pi@", "a b", "pi@host:99999", "pi@host:x", ""])
def test_bad_targets_say_the_expected_form(bad: str) -> None:
    with pytest.raises(SplitedgeError, match="USER@HOST|port"):
        Target.parse(bad)


def test_ssh_and_rsync_argv_are_lists_and_the_remote_line_round_trips() -> None:
    t = Transport(
        Target.parse("pi@10.0.0.7:2222"),
        ssh_config=Path("/x y/cfg"),
        ssh_options=["Ciphers=aes128-ctr"],
    )
    remote_argv = ["python3", "-", "stage", "--root", "/opt/split edge", "--release=a;rm -rf /"]
    argv = t.ssh_argv(remote_argv)
    assert argv[:1] == ["ssh"] and "-F" in argv and argv[argv.index("-F") + 1] == "/x y/cfg"
    assert argv[argv.index("-p") + 1] == "2222" and argv[-3:-1] == ["pi@10.0.0.7", "--"]
    assert shlex.split(argv[-1]) == remote_argv, "the device's shell sees exactly our arguments"
    r = t.rsync_argv(Path("/src dir"), "/opt/split edge/incoming/x", bwlimit_kbps=64)
    assert r[0] == "rsync" and "--partial" in r and "--bwlimit=64" in r
    assert shlex.split(r[r.index("-e") + 1]) == t.ssh_base()
    assert r[-2:] == ["/src dir/", "pi@10.0.0.7:/opt/split edge/incoming/x/"]
    assert Target.parse("root@[fe80::1]").rsync_host == "root@[fe80::1]"


def test_dry_run_contacts_nothing(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from splitedge.cli import main

    def refuse(*a: object, **k: object) -> None:
        raise AssertionError("dry run must not run anything")

    monkeypatch.setattr(subprocess, "run", refuse)
    monkeypatch.setattr(subprocess, "Popen", refuse)
    assert (
        main(
            [
                "flash",
                "--host",
                "pi@cam.local",
                "--bundle",
                str(ZOO_BUNDLE),
                "--profile",
                "pi-zero-2w",
                "--server",
                "10.0.0.5:50051",
                "--offline",
                "--dry-run",
                "--local-only",
                "--json",
            ]
        )
        == 0
    )
    plan = json.loads(capsys.readouterr().out)["plan"]
    steps = [s["step"] for s in plan]
    assert steps[:2] == ["load", "pre-flight"] and steps[-3:] == ["switch", "health", "commit"]
    assert "mv -T" in plan[-3]["command"] and "--no-index" in plan[6]["command"]


def _dry_run(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str]:
    from splitedge.cli import main

    base = ["flash", "--host", "pi@127.0.0.1:1", "--server", "10.0.0.5:50051", "--dry-run"]
    rc = main([*base, *args])
    err = capsys.readouterr().err.strip()
    return rc, err


@pytest.fixture
def signed(tmp_path: Path) -> dict[str, Path]:
    from splitedge.signing import generate_keypair, sign_bundle

    bundle = tmp_path / "signed"
    shutil.copytree(ZOO_BUNDLE, bundle)
    generate_keypair(tmp_path / "a.key", tmp_path / "a.pub")
    generate_keypair(tmp_path / "b.key", tmp_path / "b.pub")
    sign_bundle(bundle, tmp_path / "a.key")
    return {"bundle": bundle, "good": tmp_path / "a.pub", "other": tmp_path / "b.pub"}


def test_dry_run_checks_and_says_why_it_would_fail(
    tmp_path: Path,
    signed: dict[str, Path],
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    zoo, bundle = str(ZOO_BUNDLE), str(signed["bundle"])
    tampered = tmp_path / "tampered"
    shutil.copytree(signed["bundle"], tampered)
    manifest = json.loads((tampered / "manifest.json").read_text())
    manifest["version"] = "6.6.6"
    (tampered / "manifest.json").write_text(json.dumps(manifest))
    cases = [
        (["--bundle", str(tmp_path / "nope")], "not found"),
        (["--bundle", str(tampered), "--public-key", str(signed["good"])], "signature"),
        (["--bundle", bundle, "--public-key", str(signed["other"])], "signature"),
        (["--bundle", zoo, "--profile", "pi-5"], "unknown device profile 'pi-5'"),
        (["--bundle", zoo, "--backend", "vulkan"], "unknown --backend 'vulkan'"),
        (["--bundle", zoo, "--profile", "pi-zero-2w", "--backend", "es31"], "use --backend es2"),
        (["--bundle", zoo, "--profile", "pi-zero-2w"], "cannot reach pi@127.0.0.1:1 over ssh"),
    ]
    for args, why in cases:
        rc, err = _dry_run(capsys, *args)
        assert rc == 2 and why in err and len(err.splitlines()) == 1, (args, err)
    # an encoder over the profile's limits (a board with a tighter sampling budget)
    import deploy.devices

    tight = tmp_path / "profiles"
    tight.mkdir()
    text = (deploy.devices.PROFILE_DIR / "pi-zero-2w.toml").read_text()
    (tight / "pi-zero-2w.toml").write_text(
        text.replace("max_samples_per_pass = 64", "max_samples_per_pass = 4")
    )
    monkeypatch.setattr(deploy.devices, "PROFILE_DIR", tight)
    rc, err = _dry_run(capsys, "--bundle", zoo, "--profile", "pi-zero-2w", "--local-only")
    assert rc == 2 and "cannot run on pi-zero-2w" in err and "4" in err, err
    monkeypatch.undo()
    # all good here: the local-only dry run passes and lists what it checked
    rc, err = _dry_run(capsys, "--bundle", bundle, "--public-key", str(signed["good"]),
                       "--profile", "pi-zero-2w", "--backend", "es2", "--local-only")  # fmt: skip
    assert rc == 0, err


FACTS = {
    "arch": "aarch64",
    "machine": "aarch64",
    "python": "3.11.2",
    "venv": True,
    "rsync": True,
    "root": "/opt/splitedge",
    "root_writable": True,
    "user": "pi",
    "ram_total_mb": 427,
    "ram_limit_mb": None,
    "disk_free_mb": 5000,
    "disk_path": "/opt",
    "gl": "OpenGL ES 2.0 Mesa 22.3.6",
}


def test_preflight_passes_a_matching_pi_zero_and_names_each_mismatch() -> None:
    req = preflight.requirements("pi-zero-2w")
    rows, problems = preflight.check(FACTS, req)
    assert problems == [] and all(r["ok"] == "yes" for r in rows)
    bad = {
        **FACTS,
        "arch": "x86_64",
        "machine": "x86_64",
        "python": "3.9.2",
        "ram_total_mb": 8000,
        "ram_limit_mb": 256,
        "disk_free_mb": 100,
        "gl": "OpenGL ES 1.1",
        "root_writable": False,
    }
    _, problems = preflight.check(bad, req)
    text = " ".join(problems)
    for name in (
        "cpu architecture",
        "python",
        "ram: device has 256 MB (cgroup limit)",
        "free disk",
        "OpenGL ES",
        "install root writable",
    ):
        assert name in text, name
    assert "sudo install -d -o pi /opt/splitedge" in text
    rows, problems = preflight.check({**FACTS, "gl": None}, req)
    assert problems == [] and rows[-1]["ok"] == "not checked"


def test_profiles_cover_the_three_boards() -> None:
    assert {"pi-zero-2w", "pi-4b", "jetson-nano"} <= set(preflight.profiles())
    with pytest.raises(SplitedgeError, match="unknown device profile"):
        preflight.requirements("pi-5")


# -- device-side operations, run here on a temp root (the same code runs on the device) -------
def _incoming(root: Path, release: str) -> Path:
    remote.prepare(root, release)
    inc = root / "incoming" / release
    shutil.copytree(ZOO_BUNDLE, inc / "bundle")
    for name in ("probe.npz", "release.json", "splitedge.service"):
        (inc / name).write_text("x")
    (inc / "service.json").write_text(json.dumps({"server": "h:1"}))
    return inc


def _fake_runtime(root: Path, release: str) -> None:
    (root / "releases" / release / "runtime").mkdir()


def test_stage_refuses_corrupted_and_incomplete_transfers(tmp_path: Path) -> None:
    inc = _incoming(tmp_path, "a-1")
    (inc / "service.json").unlink()
    with pytest.raises(remote.Refused, match="transfer incomplete: service.json"):
        remote.stage(tmp_path, "a-1")
    (inc / "service.json").write_text("{}")
    with open(inc / "bundle" / "head.onnx", "r+b") as f:
        f.write(b"\0\0\0")
    with pytest.raises(remote.Refused, match="head.onnx: sha256 does not match"):
        remote.stage(tmp_path, "a-1")
    assert not (tmp_path / "releases" / "a-1").exists()


def test_switch_and_rollback_move_symlinks_atomically(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from deploy.flash import device_commit as commit

    monkeypatch.setattr(commit, "restart_service", lambda root: "restarted")
    for rel in ("a-1", "a-2"):
        _incoming(tmp_path, rel)
        assert remote.stage(tmp_path, rel)["already_staged"] is False
        _fake_runtime(tmp_path, rel)
    for rel in ("a-1", "a-2"):
        r = commit.begin(tmp_path, rel, deadline_s=60)
        commit.commit(tmp_path, r["pending"]["id"])
    assert (
        os.readlink(tmp_path / "current") == "releases/a-2"
        and os.readlink(tmp_path / "previous") == "releases/a-1"
    )
    assert not list(tmp_path.glob(".*.tmp*")), "no temporary links left behind"
    commit.rollback(tmp_path)
    assert (
        os.readlink(tmp_path / "current") == "releases/a-1"
        and os.readlink(tmp_path / "previous") == "releases/a-2"
    )
    assert remote.discard(tmp_path, "a-2")["removed"] is False, "previous is protected"


def test_a_release_in_use_is_never_replaced(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from deploy.flash import device_commit as commit

    monkeypatch.setattr(commit, "restart_service", lambda root: "restarted")
    _incoming(tmp_path, "a-1")
    remote.stage(tmp_path, "a-1")
    _fake_runtime(tmp_path, "a-1")
    commit.commit(tmp_path, commit.begin(tmp_path, "a-1", 60)["pending"]["id"])
    _incoming(tmp_path, "a-1")
    assert remote.stage(tmp_path, "a-1")["already_staged"] is True
    inc = _incoming(tmp_path, "a-1")
    (inc / "service.json").write_text(json.dumps({"server": "other:2"}))
    assert remote.stage(tmp_path, "a-1")["already_staged"] is True, (
        "a new server is a device setting (etc/device.json), not a new release"
    )
    inc = _incoming(tmp_path, "a-1")
    (inc / "splitedge.service").write_text("another unit")
    with pytest.raises(remote.Refused, match="in use on the device with different contents"):
        remote.stage(tmp_path, "a-1")


def test_trust_key_never_silently_changes_keys(tmp_path: Path) -> None:
    assert remote.trust_key(tmp_path, "ssh-ed25519 AAAA1 one")["changed"] is True
    assert remote.trust_key(tmp_path, "ssh-ed25519 AAAA1 other-comment")["changed"] is False
    with pytest.raises(remote.Refused, match="different signing key"):
        remote.trust_key(tmp_path, "ssh-ed25519 BBBB2")


def test_facts_report_this_machine(tmp_path: Path) -> None:
    f = remote.facts(tmp_path / "not" / "yet")
    assert f["machine"] == os.uname().machine and f["disk_path"] == str(tmp_path)
    total = next(
        int(line.split()[1])
        for line in Path("/proc/meminfo").read_text().splitlines()
        if line.startswith("MemTotal")
    )
    assert f["ram_total_mb"] == total // 1024


# -- fleets ------------------------------------------------------------------------------------
def test_fleet_flashes_the_canary_first_and_stops_at_the_first_failure(tmp_path: Path) -> None:
    fleet = tmp_path / "fleet.toml"
    fleet.write_text(
        '[defaults]\nprofile = "pi-4b"\nserver = "10.0.0.5:50051"\n'
        '[[device]]\nhost = "pi@a"\n[[device]]\nhost = "pi@b"\ncanary = true\n'
        '[[device]]\nhost = "pi@c"\nprofile = "pi-zero-2w"\n[[device]]\nhost = "pi@d"\n'
    )
    devices = load_fleet(fleet)
    assert [d.host for d in devices] == ["pi@b", "pi@a", "pi@c", "pi@d"]
    assert devices[2].overrides == {"profile": "pi-zero-2w", "server": "10.0.0.5:50051"}
    tried: list[str] = []

    def flash_one(d: FleetDevice) -> dict:
        tried.append(d.host)
        if d.host == "pi@c":
            raise SplitedgeError("health gate failed")
        return {"release": "x-1"}

    result = flash_fleet(devices, flash_one)
    assert tried == ["pi@b", "pi@a", "pi@c"] and not result["ok"]
    assert [r["result"] for r in result["devices"]] == ["ok", "ok", "FAILED", "skipped"]
    failing_canary = flash_fleet(devices, lambda d: (_ for _ in ()).throw(SplitedgeError("no")))
    assert [r["result"] for r in failing_canary["devices"]] == ["FAILED"] + ["skipped"] * 3


def test_fleet_file_mistakes_are_one_clear_line(tmp_path: Path) -> None:
    f = tmp_path / "f.toml"
    f.write_text('[[device]]\nhost = "a"\nprofle = "pi-4b"\n')
    with pytest.raises(SplitedgeError, match="unknown keys \\['profle'\\]"):
        load_fleet(f)
    f.write_text('[[device]]\nhost = "a"\ncanary = true\n[[device]]\nhost = "b"\ncanary = true\n')
    with pytest.raises(SplitedgeError, match="mark one"):
        load_fleet(f)


# -- the systemd unit --------------------------------------------------------------------------
def test_unit_is_hardened_and_valid(tmp_path: Path) -> None:
    from deploy.flash.package import render_unit

    unit = render_unit(str(tmp_path))
    for line in (
        "Type=notify",
        "Restart=on-failure",
        "RestartPreventExitStatus=78",
        "DynamicUser=yes",
        "ProtectSystem=strict",
        "NoNewPrivileges=yes",
        "WatchdogSec=",
    ):
        assert line in unit, line
    assert f"ExecStart={tmp_path}/current/runtime/venv/bin/python -m edge.service run" in unit
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        pytest.skip("systemd-analyze is not installed; the unit's syntax was not checked")
    exe = tmp_path / "current" / "runtime" / "venv" / "bin" / "python"
    exe.parent.mkdir(parents=True)
    exe.symlink_to(shutil.which("python3") or "/usr/bin/python3")
    (tmp_path / "splitedge.service").write_text(unit)
    r = subprocess.run(
        [analyze, "verify", str(tmp_path / "splitedge.service")], capture_output=True, text=True
    )
    problems = [ln for ln in r.stderr.splitlines() if "splitedge.service" in ln]
    assert not problems, problems
