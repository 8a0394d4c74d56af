"""Kernel link backends: namespaces, veth, qdiscs, stale sweep, and the self-check against theory."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from deploy.link import netns, tc
from deploy.link.kernel import BACKENDS, choose_backend, unavailable
from deploy.link.selfcheck import run_self_check
from splitedge.errors import SplitedgeError

ZOO = Path(__file__).resolve().parents[1] / "models" / "zoo" / "cartpole-ppo"
NO_NAMESPACES = netns.capability()
needs_namespaces = pytest.mark.skipif(bool(NO_NAMESPACES), reason=NO_NAMESPACES or "")


def _theory_ms(size: int) -> float:
    """The issue's reference: 2 x 20 ms + size * 8 bit / 1 Mbit/s (the 1-byte reply is free)."""
    return 2 * 20.0 + size * 8 / 1000.0


def _check_rows(rows: list[dict], backend: str) -> None:
    """The self-check's rows against the wire's floor; its 5% accuracy is a report, not a test.

    The within-5% claim is shown by `splitedge measure --self-check` in docs/results/latency.md.
    Here a loaded machine may add milliseconds to any exchange, so the only upper bounds are
    10x theory and a same-run difference: 28 KB against 512 B over the same link.
    """
    assert {r["message_B"] for r in rows} == {28 * 1024, 512}
    for r in rows:
        theory = _theory_ms(r["message_B"])
        assert r["backend"] == backend
        assert set(r) >= {"theory_ms", "measured_ms", "link_theory_ms", "error_pct", "ok"}, r
        assert r["theory_ms"] == pytest.approx(theory, abs=0.01)  # plus the 1-byte reply
        assert r["measured_ms"] >= theory - 0.5, r  # nothing beats the wire
        assert r["measured_ms"] <= 10 * theory, r  # delay or rate in the wrong unit
    by = {r["message_B"]: r["measured_ms"] for r in rows}
    # 28 KB - 512 B more bytes cost their serialisation time once: not twice (bug: bytes paced
    # by both the shaper and the proxy, or a per-packet delay), not nothing (rate not applied).
    extra, serialise = by[28 * 1024] - by[512], (28 * 1024 - 512) * 8 / 1000.0
    assert 0.5 * serialise <= extra <= 1.5 * serialise, by


def test_proxy_self_check_against_theory() -> None:
    _check_rows(run_self_check("proxy", repeats=3), "proxy")


@needs_namespaces
@pytest.mark.skipif(bool(NO_NAMESPACES or tc.missing("tbf")), reason="no tbf here")
def test_tbf_self_check_against_theory() -> None:
    rows = run_self_check("tbf", repeats=3)
    _check_rows(rows, "tbf")
    for r in rows:  # the kernel meters frames: Ethernet + IP + TCP headers, 54 B per 1460 B
        assert r["link_B_up"] >= r["message_B"] + 54 * -(-r["message_B"] // 1460)
    assert not [n for n in netns.list_ours() if n.startswith(f"splitedge-{os.getpid()}-check")]


@needs_namespaces
@pytest.mark.skipif(
    bool(NO_NAMESPACES or tc.missing("netem")),
    reason=f"netem unavailable: {NO_NAMESPACES or tc.missing('netem')}",
)
def test_netem_self_check_against_theory() -> None:
    _check_rows(run_self_check("netem", repeats=3), "netem")


@needs_namespaces
def test_pair_setup_and_teardown_are_idempotent() -> None:
    pair = netns.NamespacePair(role="t")
    try:
        pair.create()
        pair.create()  # a second create replaces, never fails or duplicates
        assert {pair.server, pair.edge} <= set(netns.list_ours())
        links = netns.run(["ip", "-n", pair.edge, "-o", "link", "show"]).stdout
        assert netns.EDGE_IF in links
        if "ethtool" not in " ".join(pair.notes):
            feats = netns.run(["ip", "netns", "exec", pair.edge, "ethtool", "-k", netns.EDGE_IF])
            for feat in ("tcp-segmentation-offload", "generic-segmentation-offload"):
                assert f"{feat}: off" in feats.stdout
        ping = netns.run(  # the two ends reach each other over the veth
            ["ip", "netns", "exec", pair.edge, sys.executable, "-c",
             f"import socket; socket.create_connection(('{netns.SERVER_IP}', 9), 2)"],
            check=False,
        )  # fmt: skip
        assert "ConnectionRefused" in ping.stderr  # reached the server side, nothing listens
    finally:
        pair.destroy()
        pair.destroy()
    assert not pair.exists()
    assert netns.root_links_ours() == []


@needs_namespaces
def test_sweep_removes_only_dead_owners() -> None:
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    stale = netns.NamespacePair(owner=dead.pid, role="t")
    live = netns.NamespacePair(role="u")
    try:
        stale.create()
        live.create()
        removed = netns.sweep_stale()
        assert stale.server in removed and stale.edge in removed
        assert not stale.exists()
        assert live.exists()  # ours: this process is alive
    finally:
        stale.destroy()
        live.destroy()


def test_backend_choice_order_and_errors() -> None:
    choice = choose_backend("auto")
    first_ok = next(b for b in BACKENDS if not unavailable(b))
    assert choice.name == first_ok
    assert len(choice.reasons) == BACKENDS.index(first_ok)  # one reason per backend passed over
    assert choose_backend("proxy").name == "proxy"
    with pytest.raises(SplitedgeError, match="unknown link backend"):
        choose_backend("carrier-pigeon")
    for backend in BACKENDS:
        if unavailable(backend):
            with pytest.raises(SplitedgeError, match="cannot run here"):
                choose_backend(backend)


def test_filler_frames_hide_at_most_a_quarter_millisecond() -> None:
    for kbit in (20, 200, 1000, 4000, 15000):
        frame = tc.filler_frame_bytes(kbit)
        assert frame is not None and 42 <= frame <= 1514
        # A frame is the largest token debt the filler can leave; it must cost <= 0.25 ms,
        # unless the smallest possible one (Ethernet + IP + UDP headers) is longer at this rate.
        assert frame * 8 / kbit <= max(0.25, 42 * 8 / kbit) + 1e-9
    assert tc.filler_frame_bytes(30000) is None  # 1514 B free at 30 Mbit/s is 0.4 ms


def _ours(owner: int) -> list[int]:
    """Processes started by a splitedge run with pid owner (they carry SPLITEDGE_OWNER)."""
    import psutil

    found = []
    for p in psutil.process_iter():
        try:
            if p.environ().get("SPLITEDGE_OWNER") == str(owner):
                found.append(p.pid)
        except (psutil.Error, OSError):
            continue
    return found


@needs_namespaces
@pytest.mark.skipif(bool(NO_NAMESPACES or tc.missing("tbf")), reason="no tbf here")
def test_ctrl_c_during_a_sweep_leaves_nothing_behind(tmp_path: Path) -> None:
    root_qdiscs = _root_qdiscs()
    # As from a terminal: SIGINT raises KeyboardInterrupt even when this test runs where SIGINT
    # is ignored (a background job of a non-interactive shell), which every child would inherit.
    # -X faulthandler: a SIGABRT below dumps every thread's stack, should the sweep hang.
    launch = (
        "import signal, sys; signal.signal(signal.SIGINT, signal.default_int_handler); "
        "from splitedge.cli import main; sys.exit(main(sys.argv[1:]))"
    )
    argv = [sys.executable, "-X", "faulthandler", "-c", launch, "measure",
            "--bundle", str(ZOO), "--links", "dsl", "--modes", "split", "--steps", "100000", "--link-backend", "tbf",
            "--out", str(tmp_path), "--no-progress"]  # fmt: skip
    # Its own session, so the SIGINT below reaches the whole process group, as Ctrl-C does.
    proc = subprocess.Popen(
        argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, start_new_session=True
    )
    try:
        end = time.monotonic() + 120
        while time.monotonic() < end and proc.poll() is None:
            spaces = [n for n in netns.list_ours() if n.startswith(f"splitedge-{proc.pid}-")]
            workers = [pid for pid in _ours(proc.pid) if "deploy.edge_worker" in _cmdline(pid)]
            if len(spaces) == 2 and workers:
                break
            time.sleep(0.2)
        else:
            pytest.fail(f"sweep never got going: {proc.stderr.read() if proc.stderr else ''}")
        time.sleep(1.0)  # mid-cell: clients stepping through the shaped link
        qdiscs = tc.qdisc_kinds(f"splitedge-{proc.pid}-edge", netns.EDGE_IF)
        assert "tbf" in qdiscs
        os.killpg(proc.pid, signal.SIGINT)
        try:
            code = proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.send_signal(signal.SIGABRT)
            _, err = proc.communicate(timeout=30)
            pytest.fail(f"sweep still running 60 s after Ctrl-C; its stacks:\n{err[-6000:]}")
        assert code == 130
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert [n for n in netns.list_ours() if n.startswith(f"splitedge-{proc.pid}-")] == []
    assert netns.root_links_ours() == []
    # the root namespace's own interfaces kept their qdiscs (bug: a tbf put on the host's link);
    # interfaces that other processes on this machine add or remove meanwhile are not ours
    after = _root_qdiscs()
    common = root_qdiscs.keys() & after.keys()
    assert {d: after[d] for d in common} == {d: root_qdiscs[d] for d in common}
    # children told to stop are given time to exit (bug: orphans that never do)
    end = time.monotonic() + 30
    while _ours(proc.pid) and time.monotonic() < end:
        time.sleep(0.1)
    assert _ours(proc.pid) == []


def _root_qdiscs() -> dict[str, list[str]]:
    """The root namespace's qdisc lines, by interface."""
    by_dev: dict[str, list[str]] = {}
    for line in netns.run(["tc", "qdisc", "show"]).stdout.splitlines():
        words = line.split()
        if "dev" in words:
            by_dev.setdefault(words[words.index("dev") + 1], []).append(line)
    return by_dev


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    except OSError:
        return ""
