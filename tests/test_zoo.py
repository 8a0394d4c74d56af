"""The shipped bundles in models/zoo/: intact, small, better than random, and each runs the
closed loop of its own task against a real policy server with no torch in the edge process."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

from splitedge.bundle import load_bundle
from splitedge.cli import main
from tests.conftest import ROOT
from tests.test_edge import NO_TORCH

ZOO = sorted(
    p
    for p in (ROOT / "models" / "zoo").iterdir()
    if (p / "manifest.json").is_file()
    and json.loads((p / "manifest.json").read_text()).get("kind") == "policy"
)  # policy bundles; the llm one (meki-d128) is tests/test_llm_zoo.py's


def test_zoo_has_a_bundle_per_task() -> None:
    tasks = {load_bundle(p).policy["task"] for p in ZOO}
    assert tasks >= {"cartpole-pixels", "cartpole-camera", "pendulum-pixels", "reacher-pixels"}


@pytest.mark.parametrize("bundle", ZOO, ids=[p.name for p in ZOO])
def test_zoo_bundle_verifies_is_small_and_beats_random(bundle: Path) -> None:
    assert main(["bundle", "verify", str(bundle)]) == 0
    size = sum(f.stat().st_size for f in bundle.rglob("*") if f.is_file())
    assert size < 2 * 2**20, f"{bundle.name} is {size} bytes"
    training = load_bundle(bundle).policy["training"]
    trained, rand = training["final_100_mean_return"], training["random_policy_mean_return"]
    assert trained > rand and training["deterministic_eval_mean_return"] > rand


@pytest.mark.parametrize("bundle", ZOO, ids=[p.name for p in ZOO])
def test_zoo_bundle_runs_its_task_closed_loop_without_torch(bundle: Path) -> None:
    from deploy.server_process import ServerProcess

    with ServerProcess(bundle) as srv:
        argv = ["edge", "run", "--bundle", str(bundle), "--server", srv.address]
        code = NO_TORCH + (
            f"from splitedge.cli import main; raise SystemExit(main({[*argv, '--steps', '30', '--json']!r}))"
        )
        r = subprocess.run(
            [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120
        )
    assert r.returncode == 0, r.stderr[-2000:]
    out = json.loads(r.stdout)
    assert out["steps"] == 30 and out["fallbacks"] == 0
    obs = load_bundle(bundle).policy["observation"]["shape"]
    assert out["bytes_up"] < math.prod(obs) / 10  # features cross the link, not frames
