"""`splitedge soak`: drift analysis against hand-computed references, and a short real run."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from deploy.clients import ClientResult
from deploy.soak import analyse, slope_per_min
from edge.telemetry import StepRecord
from splitedge.cli import main


def _record(i: int, total_ms: float, fallback: bool = False) -> StepRecord:
    return StepRecord(i, 0.1, total_ms, 0.0, 0.1, total_ms, 91, 40, fallback)


def _synthetic(seconds: float, rate_hz: float, latency: callable, rss: callable) -> ClientResult:
    t = np.arange(0.0, seconds, 1.0 / rate_hz)
    samples = [
        {"t_s": s, "cpu_pct": 50.0, "system_cpu_pct": 30.0, "rss_mb": rss(s),
         "temps_c": {"cpu": 40.0 + s / 60}, "throttled": None}
        for s in np.arange(0.5, seconds, 0.5)
    ]  # fmt: skip
    return ClientResult(
        records=[_record(i, latency(x)) for i, x in enumerate(t)],
        seconds=seconds,
        encoder="ort",
        extra={"t_s": t.tolist(), "sysmon": samples, "sysmon_sources": ["psutil"]},
    )


def test_steady_run_shows_no_drift() -> None:
    doc = analyse(_synthetic(60.0, 20.0, lambda t: 10.0, lambda t: 100.0), windows=4)
    for w in doc["windows"]:
        assert w["decisions_s"] == pytest.approx(20.0, abs=0.1)
        assert w["p50_ms"] == pytest.approx(10.0)
        assert w["rss_mb"] == pytest.approx(100.0)
    assert not any(d["drifts"] for d in doc["drift"] if d["metric"] != "temp_c")
    assert doc["decisions"] == 1200


def test_growing_latency_and_rss_are_flagged_with_their_slope() -> None:
    # latency 10 ms + 6 ms per minute, RSS 100 MB + 30 MB per minute, over 2 minutes
    doc = analyse(
        _synthetic(120.0, 10.0, lambda t: 10 + 0.1 * t, lambda t: 100 + 0.5 * t), windows=4
    )
    drift = {d["metric"]: d for d in doc["drift"]}
    assert drift["p50_ms"]["drifts"] and drift["rss_mb"]["drifts"]
    assert not drift["decisions_s"]["drifts"]
    assert drift["p50_ms"]["slope_per_min"] == pytest.approx(6.0, rel=0.02)
    assert drift["rss_mb"]["slope_per_min"] == pytest.approx(30.0, rel=0.02)
    # window medians: the latency at each window's middle (15, 45, 75, 105 s)
    assert [w["p50_ms"] for w in doc["windows"]] == pytest.approx([11.5, 14.5, 17.5, 20.5], abs=0.1)


def test_slope_of_a_line_and_of_too_little_data() -> None:
    t = np.array([0.0, 60.0, 120.0])
    assert slope_per_min(t, 3.0 * t / 60.0 + 1.0) == pytest.approx(3.0)
    assert np.isnan(slope_per_min(np.array([1.0]), np.array([2.0])))


ZOO = Path(__file__).resolve().parents[1] / "models" / "zoo" / "cartpole-ppo"


def test_soak_command_runs_and_samples_every_interval(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "soak"
    argv = ["soak", "--minutes", "0.1", "--bundle", str(ZOO), "--link", "wifi", "--windows",
            "2", "--link-backend", "proxy", "--out", str(out), "--no-progress"]  # fmt: skip
    assert main(argv) == 0
    doc = json.loads((out / "soak.json").read_text())
    assert doc["seconds"] >= 6.0
    # the per-window rates times the window lengths count every decision exactly once
    counted = sum(w["decisions_s"] * (w["to_s"] - w["from_s"]) for w in doc["windows"])
    assert counted == pytest.approx(doc["decisions"], abs=1.0)
    assert doc["decisions"] > 10
    # a sample every 0.5 s: never more often (a floor), and a loaded machine may stretch the
    # gaps but not 10-fold (bug: the interval in the wrong unit, or one sample at the end)
    gaps = np.diff([s["t_s"] for s in doc["samples"]])
    assert len(gaps) >= 2 and gaps.min() >= 0.5 * 0.95 and np.median(gaps) <= 10 * 0.5, gaps
    assert all(s["rss_mb"] > 10 for s in doc["samples"])
    assert {d["metric"] for d in doc["drift"]} >= {"decisions_s", "p50_ms", "rss_mb"}
    assert (out / "soak.png").read_bytes()[:4] == b"\x89PNG"
    assert "first window vs last" in capsys.readouterr().out


def test_windowed_latency_holds_one_window_and_matches_numpy() -> None:
    from edge.telemetry import WindowedLatency

    rng = np.random.default_rng(0)
    t = np.sort(rng.uniform(0, 60, 6000))
    lat = rng.gamma(2.0, 5.0, t.size)
    fell = rng.random(t.size) < 0.02
    acc = WindowedLatency(15.0, 4)
    held = 0
    for ti, li, fi in zip(t, lat, fell, strict=True):
        acc.add(float(ti), float(li), bool(fi))
        held = max(held, len(acc._lat))
    rows = acc.finish(61.0)
    assert held <= max(((t >= lo) & (t < lo + 15)).sum() for lo in (0, 15, 30, 45))
    for k, w in enumerate(rows):
        inside = (t >= 15 * k) & (t < 15 * (k + 1))
        assert w["decisions"] == inside.sum() and w["fallbacks"] == (inside & fell).sum()
        assert w["p50_ms"] == pytest.approx(np.median(lat[inside & ~fell]))
        assert w["p95_ms"] == pytest.approx(np.percentile(lat[inside & ~fell], 95))
    assert rows[-1]["to_s"] == 61.0


def test_soak_uses_the_workers_windows_when_it_kept_no_records() -> None:
    synthetic = _synthetic(60.0, 20.0, lambda t: 10.0, lambda t: 100.0)
    reference = analyse(synthetic, windows=4)
    from deploy.soak import latency_windows

    lean = ClientResult(
        records=[],
        seconds=synthetic.seconds,
        encoder="ort",
        extra={**synthetic.extra, "windows": latency_windows(synthetic, 4)},
    )
    assert analyse(lean, windows=4)["windows"] == reference["windows"]
    assert analyse(lean, windows=4)["decisions"] == reference["decisions"] == 1200
