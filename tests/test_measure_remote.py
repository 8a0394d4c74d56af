"""`measure --server HOST:PORT` against a `splitedge serve` started separately."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from deploy.server_process import ServerProcess, free_port
from splitedge.cli import main

ZOO = Path(__file__).resolve().parents[1] / "models" / "zoo"


def _argv(server: str, out: Path, bundle: Path = ZOO / "cartpole-ppo") -> list[str]:
    return ["measure", "--bundle", str(bundle), "--server", server, "--modes", "split,raw",
            "--steps", "20", "--warmup", "2", "--out", str(out), "--no-progress"]  # fmt: skip


def test_measure_against_a_running_server_and_refusals(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    with ServerProcess(ZOO / "cartpole-ppo") as server:
        out = tmp_path / "remote"
        assert main(_argv(server.address, out)) == 0
        doc = json.loads((out / "results.json").read_text())
        assert doc["link_backend"] == "remote"
        assert "measured against" in doc["profiles"]["remote"]["source"]
        rows = {r["mode"]: r for r in doc["rows"]}
        for mode, row in rows.items():
            assert row["link"] == "remote" and row["fallbacks"] == 0 and row["steps"] == 20
            assert row["bound_ms"] > 0 and row["p50_ms"] > 0, mode
        # raw sends the frame, split the features: same server, same run
        assert rows["raw"]["msg_up_B"] > 10 * rows["split"]["msg_up_B"]
        capsys.readouterr()

        # a bundle the server does not serve: refused in one line, before any cell runs
        other = tmp_path / "other"
        assert main(_argv(server.address, other, ZOO / "pendulum-sac")) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and "pendulum" in err, err
        assert not (other / "results.json").exists()

    port = free_port()  # nothing listens here
    assert main(_argv(f"127.0.0.1:{port}", tmp_path / "gone")) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"cannot reach a policy server at 127.0.0.1:{port}" in err
    assert main(_argv("nowhere", tmp_path / "bad")) == 2
    assert "--server takes HOST:PORT" in capsys.readouterr().err
