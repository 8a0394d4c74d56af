"""`splitedge bench server` end to end on a tiny grid: every cell measured, numbers consistent
with each other and with closed-loop theory, the markdown report written; bad options refused."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from tests.conftest import ROOT, ZOO_BUNDLE

CLIENTS = 4


def _bench(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "splitedge", "bench", "server", "--bundle", str(ZOO_BUNDLE), *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=240,
    )


def test_bench_server_measures_every_cell_and_writes_the_report(tmp_path: Path) -> None:
    out = tmp_path / "server.md"
    seconds = 0.4
    r = _bench(
        "--clients",
        str(CLIENTS),
        "--seconds",
        str(seconds),
        "--warmup",
        "0.2",
        "--client-procs",
        "2",
        "--out",
        str(out),
        "--json",
    )
    assert r.returncode == 0, r.stderr[-2000:]
    result = json.loads(r.stdout)
    rows = {(row["rpc"], row["server"]): row for row in result["rows"]}
    assert set(rows) == {
        (rpc, s)
        for rpc in ("unary", "stream")
        for s in ("splitedge split", "splitedge raw", "naive SB3")
    }
    for (_rpc, server), row in rows.items():
        assert row["errors"] == 0, row["first_error"]
        assert row["decisions_per_s"] * seconds >= CLIENTS  # every client finished round trips
        assert 0 < row["p50_ms"] <= row["p99_ms"]
        # closed loop: at most one request per client is ever outstanding, so no batch can
        # be larger than the client count; the naive server never batches
        assert 1.0 <= row["mean_batch"] <= CLIENTS
        if server == "naive SB3":
            assert row["mean_batch"] == 1.0
    for ratio in result["ratios"]:
        mine, naive = rows[(ratio["rpc"], "splitedge split")], rows[(ratio["rpc"], "naive SB3")]
        assert (
            abs(
                ratio["split / naive decisions/s"]
                - mine["decisions_per_s"] / naive["decisions_per_s"]
            )
            < 1e-9
        )
    text = out.read_text()
    assert "splitedge bench server --bundle" in text and "## splitedge / naive" in text
    assert text.count("  naive SB3  ") == 2  # one table row per RPC style


def test_bench_server_refuses_bad_options_in_one_line() -> None:
    for args, word in (
        (["--servers", "split,fast"], "split, raw, naive"),
        (["--clients", "4,x"], "integers"),
        (["--mode", "bidi"], "unary and/or stream"),
    ):
        r = _bench(*args)
        assert r.returncode != 0 and "Traceback" not in r.stderr and word in r.stderr, (
            args,
            r.stderr,
        )


def test_naive_server_replies_with_the_action_type_of_its_model(tmp_path: Path) -> None:
    import numpy as np

    from deploy.naive_server import NaivePolicy, _recorded_algo
    from edge.wire import from_tensor
    from models.export import load_model
    from models.train import TrainConfig, build_model
    from protos import policy_pb2 as pb

    # untrained models are enough: only the reply's encoding is checked, against predict
    for algo, task in (("ppo", "cartpole-pixels"), ("sac", "pendulum-pixels")):
        cfg = TrainConfig(
            task=task, algo=algo, n_envs=1, hyper={} if algo == "ppo" else {"buffer_size": 100}
        )
        run = tmp_path / algo
        run.mkdir()
        build_model(cfg).save(run / "model.zip")
        (run / "result.json").write_text(json.dumps({"config": {"algo": algo}}))
        assert _recorded_algo(run / "model.zip") == algo
        model, _ = load_model(run / "model.zip")
        obs = np.random.default_rng(0).integers(0, 256, model.observation_space.shape, np.uint8)
        request = pb.ActRequest(step=3, input=pb.Tensor(data=obs.tobytes()))
        reply = NaivePolicy(model).Act(request, None)  # type: ignore[arg-type]
        expected = np.atleast_1d(model.predict(obs, deterministic=True)[0])
        got = from_tensor(reply.action)
        assert reply.step == 3 and got.dtype == (np.int64 if algo == "ppo" else np.float32)
        np.testing.assert_array_equal(got, expected)
