"""`measure --links-file`: the user's own links, validated in one line, measured as given."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from deploy.link.kernel import unavailable
from splitedge.cli import main

ZOO = Path(__file__).resolve().parents[1] / "models" / "zoo" / "cartpole-ppo"

GOOD = """
[mine]
up_kbit = 2000
down_kbit = 4000
delay_ms = 5
queue_bytes = 32768
mtu = 1000
source = "my own link"
"""


def _measure(links: Path, out: Path, *extra: str) -> int:
    return main(["measure", "--bundle", str(ZOO), "--links-file", str(links), "--links", "mine",
                 "--modes", "split", "--steps", "5", "--warmup", "1", "--out", str(out),
                 "--no-progress", *extra])  # fmt: skip


@pytest.mark.parametrize(
    "body, says",
    [
        ("up_kbit = 1\ndown_kbit = 1\ndelay_ms = 1\nspeed = 3", "unknown keys ['speed']"),
        ("up_kbit = -5\ndown_kbit = 1\ndelay_ms = 1", "up_kbit must be a finite rate > 0, got -5"),
        (
            "up_kbit = 1\ndown_kbit = 1\ndelay_ms = 1\nloss_pct = 150",
            "loss_pct must be a percentage",
        ),
        (
            "up_kbit = 1\ndown_kbit = 1\ndelay_ms = 1\nloss_pct = -1",
            "loss_pct must be a percentage",
        ),
        ("up_kbit = 1\ndown_kbit = 1\ndelay_ms = -3", "delay_ms must be finite and >= 0"),
        ("up_kbit = 1\ndown_kbit = 1\ndelay_ms = 1\nmtu = 100", "mtu must be an integer in [576"),
        ("up_kbit = 1\ndown_kbit = 1\ndelay_ms = 1\nburst_bytes = 10", "burst_bytes must be 0"),
        (
            "up_kbit = 1\ndown_kbit = 1\ndelay_ms = 1\ntcp_rto_min_ms = 0.5",
            "tcp_rto_min_ms must be 0 (kernel default) or in [1, 60000]",
        ),
        ("up_kbit = 1\ndelay_ms = 1", "lacks ['down_kbit']"),
        ("up_kbit = 1\ndown_kbit = = 1", "cannot read link profiles"),
    ],
)
def test_bad_links_file_is_one_line(
    tmp_path: Path, body: str, says: str, capsys: pytest.CaptureFixture[str]
) -> None:
    links = tmp_path / "links.toml"
    links.write_text("[mine]\n" + body + "\n")
    assert _measure(links, tmp_path / "out") == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and says in err and str(links) in err, err
    assert not (tmp_path / "out").exists()  # refused before anything was written


def test_missing_links_file_and_unknown_name(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert _measure(tmp_path / "nope.toml", tmp_path / "out") == 2
    assert "nope.toml not found" in capsys.readouterr().err
    links = tmp_path / "links.toml"
    links.write_text("[other]\nup_kbit = 1\ndown_kbit = 1\ndelay_ms = 1\n")
    assert _measure(links, tmp_path / "out") == 2
    assert "unknown link profile 'mine'; known: other" in capsys.readouterr().err


def test_a_key_the_backend_cannot_emulate_is_refused(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    links = tmp_path / "links.toml"
    links.write_text(GOOD.replace("mtu = 1000", "mtu = 1000\nburst_bytes = 4000"))
    assert _measure(links, tmp_path / "out", "--link-backend", "proxy") == 2
    err = capsys.readouterr().err
    assert "the proxy backend cannot emulate burst_bytes 4000, mtu 1000" in err
    assert err.count("\n") == 1


@pytest.mark.skipif(bool(unavailable("tbf")), reason="needs root, netns and tbf")
def test_links_file_run_over_the_kernel_path(tmp_path: Path) -> None:
    links = tmp_path / "links.toml"
    links.write_text(GOOD)
    out = tmp_path / "out"
    assert _measure(links, out, "--link-backend", "tbf") == 0
    doc = json.loads((out / "results.json").read_text())
    assert doc["link_backend"] == "tbf"
    assert doc["profiles"]["mine"]["mtu"] == 1000
    assert doc["profiles"]["mine"]["source"] == "my own link"
    (row,) = doc["rows"]
    assert row["link"] == "mine" and row["fallbacks"] == 0 and row["steps"] == 5
    assert row["p50_ms"] >= 2 * 5 - 0.5  # nothing beats the wire's round trip
