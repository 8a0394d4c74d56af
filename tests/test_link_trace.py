"""Trace-driven links: Mahimahi and CSV traces, the shipped synthetic ones, replayed on tc."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from deploy.link.kernel import unavailable
from deploy.link.trace import load_trace
from deploy.link.tracegen import main as tracegen
from splitedge.cli import main
from splitedge.errors import SplitedgeError

ROOT = Path(__file__).resolve().parents[1]
TRACES = ROOT / "deploy" / "traces"
ZOO = ROOT / "models" / "zoo" / "cartpole-ppo"


def test_mahimahi_and_csv_rates(tmp_path: Path) -> None:
    mm = tmp_path / "t.mm"
    # 10 packets in the first 100 ms, none in the second, 5 in the third; period 300 ms
    mm.write_text("\n".join(["0"] * 10 + ["250"] * 5 + ["299"]) + "\n")
    t = load_trace(mm)
    assert t.times == (0.0, 0.1, 0.2) and t.period_s == pytest.approx(0.3)
    assert t.rates == (10 * 12_000 / 100, 0.0, 6 * 12_000 / 100)  # packets x 12,000 bit / 100 ms
    csv = tmp_path / "t.csv"
    csv.write_text("time,kbit\n0,1000\n2,3000\n")
    t = load_trace(csv)
    assert t.rates == (1000.0, 3000.0) and t.period_s == 4.0 and t.mean_kbit == 2000.0


@pytest.mark.parametrize(
    "name, body, says",
    [
        ("empty.csv", "time,kbit\n", "has no data"),
        ("words.mm", "10\nfast\n", "line 2: a Mahimahi trace has one whole ms per line"),
        ("back.mm", "10\n5\n", "line 2: ms go backwards"),
        ("zero.csv", "0,0\n1,0\n", "every rate is 0"),
        ("neg.csv", "0,100\n1,-5\n", "line 2: times must increase"),
    ],
)
def test_bad_traces_are_one_line(tmp_path: Path, name: str, body: str, says: str) -> None:
    (tmp_path / name).write_text(body)
    with pytest.raises(SplitedgeError, match=says):
        load_trace(tmp_path / name)


def test_shipped_traces_are_the_generators_output(tmp_path: Path) -> None:
    tracegen([str(tmp_path)])
    for name in ("cellular-drive.down", "cellular-drive.up", "wifi-congested.csv"):
        assert (tmp_path / name).read_text() == (TRACES / name).read_text(), name
    drive, wifi = (
        load_trace(TRACES / "cellular-drive.down"),
        load_trace(TRACES / "wifi-congested.csv"),
    )
    assert 0.0 in drive.rates  # handover outages
    assert min(wifi.rates) < 5_000 < 15_000 < max(wifi.rates)  # congestion episodes


@pytest.mark.skipif(bool(unavailable("tbf")), reason="needs root, netns and tbf")
def test_measure_over_each_shipped_trace(tmp_path: Path) -> None:
    out = tmp_path / "out"
    argv = ["measure", "--bundle", str(ZOO), "--links-file", str(TRACES / "links.toml"),
            "--links", "cellular-drive,wifi-congested", "--modes", "split", "--steps", "10",
            "--warmup", "1", "--link-backend", "tbf", "--out", str(out), "--no-progress"]  # fmt: skip
    assert main(argv) == 0
    doc = json.loads((out / "results.json").read_text())
    rows = {r["link"]: r for r in doc["rows"]}
    assert set(rows) == {"cellular-drive", "wifi-congested"}
    for link, row in rows.items():
        assert row["fallbacks"] == 0 and row["steps"] == 10, link
    # 10 cellular steps take >= 0.6 s (2 x 30 ms delay each): several 100 ms trace steps, each
    # a new rate (a Wi-Fi cell can be over within one step, so it is not asserted there)
    assert rows["cellular-drive"]["rate_changes"] >= 2
    assert sum("from trace" in n for n in doc["notes"]) == 4
