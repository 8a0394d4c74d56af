"""Packet loss on the kernel path without netem (nftables numgen), counted in packets."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from deploy.link import loss, netns
from deploy.link.kernel import set_rto_min, unavailable, unsupported
from deploy.link.profiles import LinkProfile
from deploy.link.tc import netem_args
from splitedge.cli import main

ZOO = Path(__file__).resolve().parents[1] / "models" / "zoo" / "cartpole-ppo"
KERNEL = pytest.mark.skipif(
    bool(unavailable("tbf") or loss.missing()), reason="needs root, netns, tbf and nftables"
)


@KERNEL
def test_loss_self_check_counts_packets_each_way() -> None:
    rows = loss.self_check(loss_pct=10.0, packets=20_000)
    assert [r["direction"] for r in rows] == ["up", "down"]
    for r in rows:
        # >= 10,000 packets reached the loss stage (a loaded host may drop some before it)
        assert r["nft_seen"] >= 10_000, r
        # within 10% relative of the configured 10% (4.7 sigma at 20,000 packets), counted by
        # the receiver, independently of the drops nftables reports
        assert r["ok"] and 9.0 <= r["measured_pct"] <= 11.0, r
        assert 9.0 <= 100 * r["nft_lost"] / r["nft_seen"] <= 11.0, r


def test_loss_is_refused_where_it_cannot_be_emulated_and_netem_gets_it() -> None:
    lossy = LinkProfile("lossy", 1000, 1000, 10, loss_pct=2.5)
    assert "proxy backend cannot emulate loss_pct 2.5" in unsupported(lossy, "proxy")
    assert unsupported(lossy, "netem") == ""
    assert netem_args(1000, lossy)[3:6] == ["loss", "random", "2.5%"]
    assert "loss" not in netem_args(1000, LinkProfile("clean", 1000, 1000, 10))


def test_rto_min_is_a_kernel_route_setting_the_proxy_cannot_apply() -> None:
    fast = LinkProfile("fast-rto", 1000, 1000, 10, tcp_rto_min_ms=20)
    assert "tcp_rto_min_ms 20" in unsupported(fast, "proxy")
    assert unsupported(fast, "tbf") == "" or "tcp_rto_min_ms" not in unsupported(fast, "tbf")


@KERNEL
def test_rto_min_lands_on_both_veth_routes_and_is_undone() -> None:
    pair = netns.NamespacePair(role="rto").create()
    try:
        set_rto_min(pair, 20)
        for ns in (pair.edge, pair.server):
            routes = netns.run(["ip", "-n", ns, "route"]).stdout
            assert "rto_min lock 20ms" in routes, routes
        set_rto_min(pair, 0)
        for ns in (pair.edge, pair.server):
            assert "rto_min" not in netns.run(["ip", "-n", ns, "route"]).stdout
    finally:
        pair.destroy()


@KERNEL
def test_measure_over_a_lossy_kernel_link(tmp_path: Path) -> None:
    links = tmp_path / "links.toml"
    # 20% each way: over ~80 packets per direction P(no drop) ~ 2e-8, so drops are certain
    links.write_text("[lossy]\nup_kbit = 3000\ndown_kbit = 4000\ndelay_ms = 10\nloss_pct = 20\n")
    out = tmp_path / "out"
    argv = ["measure", "--bundle", str(ZOO), "--links-file", str(links), "--links", "lossy",
            "--modes", "split", "--steps", "20", "--warmup", "1", "--link-backend", "tbf",
            "--out", str(out), "--no-progress"]  # fmt: skip
    assert main(argv) == 0
    doc = json.loads((out / "results.json").read_text())
    assert any("nftables numgen" in n for n in doc["notes"])
    (row,) = doc["rows"]
    # TCP recovers losses, but a chain of retransmission timeouts may outlast a deadline by
    # chance: a link that delivers nothing (every step a fallback) is the bug guarded here
    assert row["fallbacks"] < row["steps"] == 20
    assert row["loss_up_pct"] > 0 and row["loss_down_pct"] > 0
    assert row["loss_up_pct"] < 60 and row["loss_down_pct"] < 60
    assert row["retrans"] > 0  # TCP resent what was dropped, counted in the namespaces
    # retransmission timeouts (>= 200 ms on Linux) show in the tail, against this cell's median
    assert row["p99_ms"] > row["p50_ms"]
