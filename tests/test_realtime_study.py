"""The latency-hiding study's plan (models/realtime_sweep.py) and report
(deploy/realtime_study.py), on a made-up study whose numbers are worked out here."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import pytest

from deploy import realtime_study
from models.realtime_sweep import chain, link_ticks

SEEDS = [0, 1, 2, 3, 4]


def _args(**kw: object) -> argparse.Namespace:
    base = dict(task="pendulum-pixels", algo="sac", links=["wifi", "3g"], links_file=None,
                timesteps=100, episodes=3, seeds=SEEDS, chunk=0, control_hz=None,
                distill_timesteps=2400)  # fmt: skip
    return argparse.Namespace(**{**base, **kw})


def test_the_plain_policy_is_trained_once_and_scored_sync_and_on_every_link(tmp_path: Path) -> None:
    steps = chain(tmp_path, _args(), "hold", "wifi", 3, 0)
    outputs = [done.name for done, _ in steps]
    assert outputs == ["result.json", "manifest.json", "delay_eval-sync.json",
                       "delay_eval-wifi.json", "delay_eval-3g.json",
                       "delay_eval-ceiling-wifi.json", "delay_eval-ceiling-3g.json"]  # fmt: skip
    assert steps[0][0].parent.name == "pendulum-pixels-sac-plain-s3"
    assert "--delay-profile" not in steps[0][1]
    ceiling = steps[-1][1]
    assert ceiling[-1] == "--ceiling" and ceiling[ceiling.index("--link") + 1] == "3g"


def test_a_distilled_policy_learns_from_its_seeds_plain_one(tmp_path: Path) -> None:
    steps = chain(tmp_path, _args(), "distilled", "3g", 2, 0)
    train = steps[0][1]
    teacher = train[train.index("--distill-from") + 1]
    assert teacher == str(tmp_path / "pendulum-pixels-sac-plain-s2")
    assert train[train.index("--timesteps") + 1] == "2400"
    assert train[train.index("--delay-profile") + 1] == "3g"
    assert steps[0][0].parent.name == "pendulum-pixels-sac-distilled-3g-s2"


def test_a_chunk_policy_covers_the_links_longest_delay(tmp_path: Path) -> None:
    hz, ticks = link_ticks("pendulum-pixels", "3g", None)
    # 3g: 300 ms round trip + 10 ms off the link, jitter 0 -> ceil(310 / 50) = 7 ticks at 20 Hz
    assert (hz, ticks) == (pytest.approx(20.0), 7)
    steps = chain(tmp_path, _args(), "chunk", "3g", 0, ticks + 1)
    train = steps[0][1]
    assert (
        train[train.index("--chunk") + 1] == "8"
        and train[train.index("--delay-profile") + 1] == "3g"
    )
    assert [d.name for d, _ in steps][-1] == "delay_eval-3g.json"
    assert steps[0][0].parent.name == "pendulum-pixels-sac-chunk-3g-s0"


def _study(tmp_path: Path) -> Path:
    """A made-up 5-seed study: sync ~ -150, random -1200; on 3g hold loses most of it,
    chunk keeps nearly all; measured rows for hold on 3g."""
    study = tmp_path / "runs" / "pendulum-pixels-sac"
    study.mkdir(parents=True)
    sync = [-150.0, -140.0, -160.0, -155.0, -145.0]
    summary = {
        "task": "pendulum-pixels", "algo": "sac", "control_hz": 20.0, "timesteps": 100,
        "episodes": 3, "sync": dict(zip(map(str, SEEDS), sync, strict=True)),
        "random": {str(s): -1200.0 for s in SEEDS},
        "links": {"3g": {"delay_ticks_max": 7, "chunk_length": 8,
                         "hold": {str(s): -900.0 + s for s in SEEDS},
                         "delay-aware": {str(s): None for s in SEEDS},
                         "chunk": {str(s): -200.0 - s for s in SEEDS},
                         "ceiling": {str(s): -160.0 for s in SEEDS}}},
    }  # fmt: skip
    (study / "summary.json").write_text(json.dumps(summary))
    for s in SEEDS:
        run = study / f"pendulum-pixels-sac-plain-s{s}"
        out = run / "measure-3g"
        out.mkdir(parents=True)
        (run / "result.json").write_text(json.dumps({"config": {"seed": s}}))  # as train writes
        row = {"link": "3g", "episode_return": -1000.0 + 10 * s, "stale_share": 1.0,
               "age_p50": 7, "age_p95": 8}  # fmt: skip
        (out / "results.json").write_text(json.dumps({"realtime": [row]}))
    return study


def test_report_normalises_between_random_and_the_sync_iqm(tmp_path: Path) -> None:
    summary, rows = realtime_study.study_rows(_study(tmp_path), None)
    sync_iqm = np.mean(
        sorted([-150.0, -140.0, -160.0, -155.0, -145.0])[1:4]
    )  # rliable trims 1 of 5
    assert summary["sync_iqm"] == pytest.approx(sync_iqm)
    by = {(r["link"], r["strategy"]): r for r in rows}
    assert set(by) == {
        ("none (sync)", "sync"), ("3g", "hold"), ("3g", "chunk"), ("3g", "ceiling"),
    }  # no delay-aware seeds: no row  # fmt: skip
    hold = by[("3g", "hold")]
    assert hold["norm"][0] == pytest.approx((-900.0 + 1200.0) / (sync_iqm + 1200.0))
    assert hold["rtt_ms"] == 300 and len(hold["real"]) == 5 and not by[("3g", "chunk")]["real"]
    goal = realtime_study.goal_lines(rows)
    # the ceiling is a reference, not a strategy that could meet the goal
    assert "3g: hold keeps 0.29, best chunk keeps 0.95 (ceiling 0.99): **met**" in "\n".join(goal)


def test_report_writes_the_markdown_and_plot(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _study(tmp_path)
    md, png = tmp_path / "realtime.md", tmp_path / "plot.png"
    argv = ["realtime_study", "report", "--runs", str(tmp_path / "runs"), "--markdown", str(md),
            "--plot", str(png)]  # fmt: skip
    monkeypatch.setattr(sys, "argv", argv)
    assert realtime_study.main() == 0
    text = md.read_text()
    assert "| 3g | 300 | 7 | chunk 8 |" in text and "(n=5)" in text
    # the measured hold column: IQM of -1000..-960 by 10 is -980
    assert "| -980.0 [" in text and "| 1.00 | 7 / 8 |" in text
    assert png.read_bytes()[:4] == b"\x89PNG"
