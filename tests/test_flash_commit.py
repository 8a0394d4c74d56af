"""The device's commit model, on a temp root (the same code runs on the device): a switched
release is pending; a forked watchdog reverts it at the deadline unless it is committed.

The emulated-device tests (test_flash_e2e.py) kill the flasher for real; these check the
device side's rules quickly and without ssh.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from deploy.flash import device_commit as commit
from deploy.flash.device_base import Refused
from deploy.flash.transport import device_script

pytestmark = pytest.mark.timeout(120)


@pytest.fixture
def root(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A device root with releases a-1..a-3 staged, a-1 current; services are not started."""
    calls: list[str] = []
    monkeypatch.setattr(commit, "restart_service", lambda r: calls.append("restart") or "restarted")
    monkeypatch.setattr(commit, "stop_service", lambda r: calls.append("stop") or "stopped")
    for rel in ("a-1", "a-2", "a-3"):
        (tmp_path / "releases" / rel / "runtime").mkdir(parents=True)
    (tmp_path / "current").symlink_to("releases/a-1")
    return tmp_path


def _links(root: Path) -> tuple[str | None, str | None]:
    def name(link: Path) -> str | None:
        return os.readlink(link).split("/")[-1] if link.is_symlink() else None

    return name(root / "current"), name(root / "previous")


def _events(root: Path) -> list[tuple[str, str | None]]:
    lines = (root / "state" / "history.jsonl").read_text().splitlines()
    return [(e["event"], e["to"]) for e in map(json.loads, lines)]


def _wait_state(root: Path, state: str, timeout_s: float) -> dict:
    end = time.monotonic() + timeout_s
    while time.monotonic() < end:
        txn = commit.transaction(root) or {}
        if txn.get("state") == state and (state != "reverted" or "restored" in txn):
            return txn
        time.sleep(0.05)
    raise AssertionError(f"not {state} within {timeout_s} s: {commit.transaction(root)}")


def test_a_committed_release_stays_and_its_watchdog_leaves(root: Path) -> None:
    r = commit.begin(root, "a-2", deadline_s=60)
    assert _links(root) == ("a-2", "a-1") and r["previous"] == "a-1"
    txn = commit.transaction(root)
    assert txn and txn["state"] == "pending" and txn["deadline_s"] == 60
    watchdog = r["pending"]["watchdog"]["pid"]
    assert Path(f"/proc/{watchdog}").exists(), "the watchdog runs before anything is confirmed"
    commit.commit(root, r["pending"]["id"], "probe ok")
    assert commit.transaction(root)["state"] == "committed"  # type: ignore[index]
    for _ in range(200):  # it polls its transaction and exits once it is not pending
        if not commit._watchdog_alive(txn | {"watchdog": r["pending"]["watchdog"]}):
            break
        time.sleep(0.05)
    assert not commit._watchdog_alive(txn | {"watchdog": r["pending"]["watchdog"]})
    assert _links(root) == ("a-2", "a-1")
    with pytest.raises(Refused, match="committed.*splitedge rollback"):
        commit.revert(root, r["pending"]["id"], "late")
    assert _events(root) == [("flash", "a-2"), ("commit", "a-2")]


def test_the_device_reverts_an_unconfirmed_release_by_itself(root: Path) -> None:
    (root / "previous").symlink_to("releases/a-3")
    r = commit.begin(root, "a-2", deadline_s=1.0)
    assert _links(root) == ("a-2", "a-1")
    # nobody confirms: the flasher is gone. The forked watchdog acts alone.
    txn = _wait_state(root, "reverted", timeout_s=60)
    assert _links(root) == ("a-1", "a-3"), "current and previous exactly as before the flash"
    assert txn["by"] == "device watchdog" and "not confirmed within 1 s" in txn["why"]
    started = time.mktime(time.strptime(txn["started_at"], "%Y-%m-%dT%H:%M:%SZ"))
    reverted = time.mktime(time.strptime(txn["reverted_at"], "%Y-%m-%dT%H:%M:%SZ"))
    assert reverted - started >= 0, "never before the deadline (1 s resolution)"
    assert txn["restored"]["release"] == "a-1"
    assert _events(root) == [("flash", "a-2"), ("revert", "a-1")]
    with pytest.raises(Refused, match="too late: the device reverted a-2"):
        commit.commit(root, r["pending"]["id"])


def test_a_failed_gate_reverts_at_once_and_a_first_flash_leaves_nothing(
    tmp_path: Path, root: Path
) -> None:
    r = commit.begin(root, "a-2", deadline_s=60)
    back = commit.revert(root, r["pending"]["id"], "health gate failed: x")
    assert back["current"] == "a-1" and _links(root) == ("a-1", None)
    assert commit.transaction(root)["why"] == "health gate failed: x"  # type: ignore[index]
    assert commit.revert(root, r["pending"]["id"], "again")["current"] == "a-1", "idempotent"

    (root / "current").unlink()
    r = commit.begin(root, "a-3", deadline_s=60)
    assert commit.revert(root, r["pending"]["id"], "bad")["current"] is None
    assert not (root / "current").exists()


def test_one_pending_release_at_a_time_and_a_dead_watchdog_reverts_at_next_contact(
    root: Path,
) -> None:
    r = commit.begin(root, "a-2", deadline_s=60)
    with pytest.raises(Refused, match="a-2 is pending on the device since .* reverts it by itself"):
        commit.begin(root, "a-3", deadline_s=60)
    os.kill(r["pending"]["watchdog"]["pid"], 9)  # as after a power cut
    time.sleep(0.2)
    commit.settle(root)
    txn = commit.transaction(root)
    assert txn and txn["state"] == "reverted" and "watchdog was gone" in txn["why"]
    assert _links(root) == ("a-1", None)


def _boot(root: Path) -> tuple[int, dict]:
    """What the systemd unit's ExecStartPre runs at boot: the release's own device.py."""
    r = subprocess.run(
        [sys.executable, "-I", str(root / "current" / "device.py"), "boot", "--root", str(root)],
        capture_output=True,
        text=True,
        cwd="/",
        timeout=60,
    )
    return r.returncode, json.loads(r.stdout.splitlines()[-1])


def test_a_release_pending_across_a_reboot_reverts_before_the_service_starts(
    root: Path,
) -> None:
    for rel in ("a-1", "a-2"):  # as package.stage_release writes it into every release
        (root / "releases" / rel / "device.py").write_text(device_script())
    assert _boot(root) == (0, {"ok": True, "reverted": False, "current": "a-1", "root": str(root)})
    r = commit.begin(root, "a-2", deadline_s=60)
    os.kill(r["pending"]["watchdog"]["pid"], 9)  # the power went; its watchdog with it
    time.sleep(0.2)
    rc, out = _boot(root)
    assert rc == 0 and out["reverted"] and out["current"] == "a-1", out
    txn = commit.transaction(root)
    assert txn and txn["state"] == "reverted" and txn["by"] == "device at boot", txn
    assert "restarted while a-2 was pending" in txn["why"]
    assert txn["service"] == "boot: started by the service manager"  # it starts what is current
    assert _links(root) == ("a-1", None)
    assert not (root / "run" / "supervisor.pid").exists(), "nothing was started by the script"


def test_a_first_flash_pending_across_a_reboot_leaves_nothing_to_start(root: Path) -> None:
    (root / "current").unlink()  # a device never flashed before
    r = commit.begin(root, "a-1", deadline_s=60)
    os.kill(r["pending"]["watchdog"]["pid"], 9)
    time.sleep(0.2)
    script = root / "device.py"  # the pending release's script, run from beside it
    script.write_text(device_script())
    p = subprocess.run(
        [sys.executable, "-I", str(script), "boot", "--root", str(root)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    out = json.loads(p.stdout.splitlines()[-1])
    assert p.returncode == 1 and out["reverted"] and out["current"] is None, out  # unit stops
    assert _links(root) == (None, None)


def test_rollback_by_hand_reverts_a_pending_release_or_goes_to_any_version(root: Path) -> None:
    r = commit.begin(root, "a-2", deadline_s=60)
    assert commit.rollback(root)["current"] == "a-1"
    assert commit.transaction(root)["by"] == "operator"  # type: ignore[index]
    assert commit.rollback(root, to="3")["current"] == "a-3" and _links(root) == ("a-3", "a-1")
    assert commit.rollback(root)["current"] == "a-1" and _links(root) == ("a-1", "a-3")
    with pytest.raises(Refused, match="no release '9' on the device; it has: a-1, a-2, a-3"):
        commit.rollback(root, to="9")
    del r


def test_the_device_script_runs_on_a_bare_python(tmp_path: Path) -> None:
    """No splitedge on the device: remote.py and its device modules travel as one script."""
    r = subprocess.run(
        [sys.executable, "-I", "-", "status", "--root", str(tmp_path)],
        input=device_script(),
        capture_output=True,
        text=True,
        cwd="/",
        timeout=60,
    )
    out = json.loads(r.stdout.splitlines()[-1])
    assert r.returncode == 0 and out["ok"] and out["transaction"] is None, r.stderr


def test_device_settings_keys_agree_with_the_service() -> None:
    from deploy.flash.device_base import DEVICE_SETTINGS
    from edge.service import DEVICE_SETTINGS as SERVICE_SETTINGS

    assert DEVICE_SETTINGS == SERVICE_SETTINGS


def test_new_settings_are_pending_too_and_revert_to_the_old_ones(root: Path) -> None:
    settings = root / "etc" / "device.json"
    r = commit.begin(root, "a-1", 60, "flash", {"server": "a:1"})
    commit.commit(root, r["pending"]["id"])
    r = commit.begin(root, "a-1", 60, "reconfigure", {"server": "b:2"})
    assert json.loads(settings.read_text())["server"] == "b:2" and _links(root)[0] == "a-1"
    commit.revert(root, r["pending"]["id"], "health gate failed: b:2 refused")
    assert json.loads(settings.read_text()) == {"server": "a:1"}


def test_releases_are_listed_and_pruned_but_never_current_or_previous(root: Path) -> None:
    from deploy.flash import device_manage as manage

    for i, rel in enumerate(("a-1", "a-2", "a-3")):
        (root / "releases" / rel / "runtime").rmdir()
        (root / "runtimes" / f"rt{i}").mkdir(parents=True)
        (root / "releases" / rel / "runtime").symlink_to(f"../../runtimes/rt{i}")
        info = {"version": rel[2:], "flashed_at": f"2026-01-0{i + 1}T00:00:00Z"}
        (root / "releases" / rel / "release.json").write_text(json.dumps(info))
    r = commit.begin(root, "a-3", 60)
    commit.revert(root, r["pending"]["id"], "health gate failed: x")
    (root / "previous").symlink_to("releases/a-2")
    (root / "incoming" / "a-9").mkdir(parents=True)
    rows = {r["release"]: r for r in manage.releases(root)}
    assert [rows[k]["state"] for k in ("a-1", "a-2")] == ["current", "previous"]
    assert rows["a-3"]["state"].startswith("reverted at") and "x" in rows["a-3"]["state"]
    out = manage.prune(root, keep=0)
    assert out["removed"] == ["a-3"] and out["runtimes_removed"] == ["rt2"]
    assert out["incoming_removed"] == ["a-9"] and sorted(out["kept"]) == ["a-1", "a-2"]
    r = commit.begin(root, "a-2", 60)
    with pytest.raises(Refused, match="a-2 is pending"):
        manage.prune(root, keep=0)


def test_the_device_config_wins_over_the_releases_settings(tmp_path: Path) -> None:
    from edge.service import ServiceConfig

    release, etc = tmp_path / "releases" / "a-1", tmp_path / "etc"
    release.mkdir(parents=True)
    etc.mkdir()
    (etc / "token").write_text("t0ken\n")
    config = {"bundle": "bundle", "server": "old:1", "backend": "auto"}
    config["device_config"] = str(etc / "device.json")
    (release / "service.json").write_text(json.dumps(config))
    assert ServiceConfig.load(release / "service.json").server == "old:1", "no device config yet"
    settings = {"server": "new:2", "backend": "ort", "token_file": str(etc / "token")}
    (etc / "device.json").write_text(json.dumps({**settings, "unknown": 1}))
    cfg = ServiceConfig.load(release / "service.json")
    assert (cfg.server, cfg.backend) == ("new:2", "ort")
    assert cfg.security().token() == "t0ken"
