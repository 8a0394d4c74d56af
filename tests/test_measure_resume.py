"""Nothing measured is lost: --out checked before the sweep, cells kept on Ctrl-C, reruns resume."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from splitedge.cli import main

ROOT = Path(__file__).resolve().parents[1]
ZOO = ROOT / "models" / "zoo" / "cartpole-ppo"
STEPS = 120
# a quick link, then one whose 500 ms round trips keep its cell busy for a minute, so the
# SIGINT lands inside it however starved this test's polling is (at 300 ms and 30 or even
# 80 steps, CI runs under stress-ng finished the second cell before the signal arrived;
# at 3 s a starved run's client could not say Hello within connect()'s 5 s)
LINKS = """
[quick]
up_kbit = 20000
down_kbit = 20000
delay_ms = 1
jitter_ms = 0
queue_bytes = 262144

[slow]
up_kbit = 20000
down_kbit = 20000
delay_ms = {slow_ms}
jitter_ms = 0
queue_bytes = 262144
"""


def _argv(out: Path, links: Path) -> list[str]:
    return ["measure", "--bundle", str(ZOO), "--links", "quick,slow", "--links-file", str(links),
            "--modes", "split", "--steps", str(STEPS), "--warmup", "1", "--link-backend",
            "proxy", "--out", str(out), "--no-progress"]  # fmt: skip


def test_ctrl_c_keeps_finished_cells_and_rerun_measures_only_the_rest(tmp_path: Path) -> None:
    out, links = tmp_path / "m", tmp_path / "links.toml"
    links.write_text(LINKS.format(slow_ms=250))
    proc = subprocess.Popen(
        [sys.executable, "-m", "splitedge", *_argv(out, links)],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        # a pytest-xdist worker may ignore SIGINT, and a child inherits that: Python then
        # never turns Ctrl-C into KeyboardInterrupt (CI runs B and C lost every SIGINT)
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    cells = out / "cells.jsonl"
    deadline = time.monotonic() + 180  # generous: structure, not speed, is under test
    while not (cells.exists() and cells.read_text().count("\n") >= 1):
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline, "first cell never finished"
        time.sleep(0.05)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    assert "interrupted; 1 finished cell(s) kept in" in err
    assert "Traceback" not in err
    doc = json.loads((out / "results.json").read_text())
    assert doc["partial"] is True
    assert [(r["link"], r["mode"]) for r in doc["rows"]] == [("quick", "split")]
    quick_before = doc["rows"][0]
    assert len(cells.read_text().splitlines()) == 1

    # the same command again, the slow link now quick to measure (its cell was never
    # stored, and quick's profile is unchanged): quick comes from disk, only slow is measured
    links.write_text(LINKS.format(slow_ms=20))
    assert main(_argv(out, links)) == 0
    doc = json.loads((out / "results.json").read_text())
    assert "partial" not in doc
    assert [r["link"] for r in doc["rows"]] == ["quick", "slow"]
    assert doc["rows"][0] == quick_before
    assert any("resumed 1 cell(s)" in n and "measured 1" in n for n in doc["notes"])
    assert doc["rows"][1]["fallbacks"] == 0 and doc["rows"][1]["steps"] == STEPS
    assert not cells.exists()  # complete: a rerun measures afresh


def test_a_cell_with_other_settings_is_measured_again(tmp_path: Path) -> None:
    from deploy.cell_store import CellStore

    store = CellStore(tmp_path)
    store.open()
    row = {"link": "wifi", "mode": "split", "clients": 1, "p50_ms": 1.0}

    class Done:
        link, mode, clients, encoder = "wifi", "split", 1, "ort"

        def row(self) -> dict[str, object]:
            return row

        def latencies(self) -> list[float]:
            return [1.0]

    store.add("wifi/split/x1", {"steps": 10}, Done())
    with (tmp_path / "cells.jsonl").open("a") as f:
        f.write('{"key": "3g/split/x1", "fing')  # torn by a crash mid-write
    again = CellStore(tmp_path)
    again.open()
    assert again.lookup("wifi/split/x1", {"steps": 20}) is None  # other settings
    assert again.lookup("3g/split/x1", {"steps": 10}) is None  # torn line dropped
    cell = again.lookup("wifi/split/x1", {"steps": 10})
    assert cell is not None and cell.row() == row and cell.latencies() == [1.0]
    assert CellStore(tmp_path, resume=False).lookup("wifi/split/x1", {"steps": 10}) is None


@pytest.mark.parametrize("kind", ["file", "under-a-file"])
def test_unwritable_out_refused_before_anything_runs(
    tmp_path: Path, kind: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    import deploy.measure as measure

    def no_server(*a: object, **k: object) -> None:
        raise AssertionError("the sweep started despite an unwritable --out")

    monkeypatch.setattr(measure, "shaped_server", no_server)
    blocker = tmp_path / "blocker"
    blocker.write_text("x")
    out = blocker if kind == "file" else blocker / "results"
    links = tmp_path / "links.toml"
    links.write_text(LINKS.format(slow_ms=20))
    assert main(_argv(out, links)) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"--out {out}" in err
    assert os.path.isfile(blocker)
