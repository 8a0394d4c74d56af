"""`splitedge measure --loop both`: the real-time loop end to end over the userspace link.

Structure and physics only, never timings: every tick is accounted for, and no reply can
beat the link's 30 ms round trip, so at 50 Hz (20 ms ticks) no action is younger than
ceil(30 / 20) = 2 ticks."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from splitedge.cli import main
from tests.conftest import ROOT, ZOO_BUNDLE

TICKS = 30


def test_measure_both_loops_reports_action_age_and_returns(
    tmp_path: Path, links_file: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "m"
    argv = ["measure", "--bundle", str(ZOO_BUNDLE), "--links", "slow", "--modes", "split",
            "--loop", "both", "--control-hz", "50", "--steps", str(TICKS), "--warmup", "2",
            "--link-backend", "proxy", "--out", str(out), "--no-progress",
            "--markdown", str(out / "report.md")]  # fmt: skip
    assert main(argv) == 0
    text = capsys.readouterr().out
    assert "real time: decision latency" in text and "action age histogram" in text
    doc = json.loads((out / "results.json").read_text())
    assert doc["control_hz"] == 50.0
    assert "real-time loop at 50 Hz (--control-hz)" in doc["notes"]
    (sync,) = doc["rows"]
    (rt,) = doc["realtime"]
    assert sync["loop"] == "sync" and sync["steps"] == TICKS and sync["fallbacks"] == 0
    assert rt["loop"] == "realtime" and rt["control_hz"] == 50.0 and rt["ticks"] == TICKS
    # every tick acted on an answered action or the default one, and sent or counted why not
    hist = {int(age): n for age, n in rt["age_hist"].items()}
    assert sum(hist.values()) + rt["default_ticks"] == TICKS
    assert rt["requests"] + rt["unsent"] == TICKS
    assert rt["unanswered"] == 0  # the run waits out replies still in flight
    assert len(doc["latencies_ms"]["slow/split/realtime"]) == rt["requests"]
    # physics: a reply takes at least the 30 ms round trip, 1.5 ticks, so ages are >= 2
    assert hist and min(hist) >= math.ceil(30 / 20)
    assert rt["p50_ms"] >= 30.0
    assert rt["age_p50"] <= rt["age_p95"] <= rt["age_max"] == max(hist)
    assert rt["stale_share"] == 1.0  # no action was fresh, by the same bound
    # the sync return of the same policy on the same link, next to the real-time one
    assert rt["sync_return"] == sync["episode_return"]
    assert rt["sync_episodes"] == sync["episodes"]
    assert sync["episode_return"] > 0 and rt["episode_return"] > 0
    assert (out / "realtime.csv").read_text().startswith("link,mode,clients,loop,")
    report = (out / "report.md").read_text()
    assert "## Real time" in report and "slow/split:" in report


def test_realtime_refusals_are_one_line(capsys: pytest.CaptureFixture[str]) -> None:
    reacher = ROOT / "models" / "zoo" / "reacher-ddpg"
    base = ["measure", "--links", "wifi", "--out", "/nonexistent", "--no-progress"]
    assert main([*base, "--bundle", str(reacher), "--loop", "realtime"]) == 2
    err = capsys.readouterr().err
    assert "declares no control rate" in err and "--control-hz HZ" in err
    assert main([*base, "--bundle", str(ZOO_BUNDLE), "--loop", "both", "--rpc", "unary"]) == 2
    assert "needs --rpc stream" in capsys.readouterr().err
    assert main([*base, "--bundle", str(ZOO_BUNDLE), "--loop", "both", "--control-hz", "0"]) == 2
    assert "--control-hz must be > 0" in capsys.readouterr().err


def test_cell_summary_pools_clients_by_hand() -> None:
    from deploy.realtime_report import episode_return, summarise

    a = {"ages": [None, 2, 2, 3], "episode_returns": [10.0], "partial_return": 4.0,
         "overruns": 1, "unsent": 0}  # fmt: skip
    b = {"ages": [None, None, 0, 1], "episode_returns": [20.0, 30.0], "partial_return": 1.0,
         "overruns": 0, "unsent": 2}  # fmt: skip
    s = summarise([a, b])
    # pooled ages 2, 2, 3, 0, 1 -> sorted 0 1 2 2 3: nearest-rank p50 is the 3rd, p95 the 5th
    assert (s["age_p50"], s["age_p95"], s["age_max"]) == (2, 3, 3)
    assert s["age_hist"] == {"0": 1, "1": 1, "2": 2, "3": 1} and s["default_ticks"] == 3
    assert s["stale_share"] == pytest.approx(7 / 8)  # all but the one age-0 tick
    assert (s["unsent"], s["overruns"]) == (2, 1)
    assert (s["episode_return"], s["episodes"]) == (20.0, 3)  # finished ones only
    assert episode_return([], [4.0, 1.0]) == (2.5, 0)  # none finished: the running ones
