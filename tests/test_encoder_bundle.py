"""Every encoder backend on the shipped bundle against SB3, backend choice, and `splitedge bench encoder`."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from edge.encoder import backends, make_encoder
from edge.encoder.bench import head_actions
from edge.encoder.calibrate import task_frames
from edge.encoder.egl import GLUnavailable, context
from edge.encoder.ort import cpu_session
from splitedge.bundle import load_bundle
from splitedge.cli import main
from tests.conftest import ROOT, ZOO_BUNDLE

SB3_ZIP = ZOO_BUNDLE.parent / "cartpole-ppo.sb3.zip"
OBSERVATIONS = 240
# Importing any of these makes the import fail: the device path must not need them.
NO_TORCH = "import sys; sys.modules.update({m: None for m in ('torch', 'stable_baselines3', 'models', 'server')});"


@pytest.fixture(scope="module")
def sb3_reference() -> tuple[np.ndarray, np.ndarray]:
    """Task observations and SB3's deterministic actions on them."""
    from models.export import sb3_actions

    obs = task_frames("cartpole-pixels", OBSERVATIONS, seed=7)
    return obs, np.asarray(sb3_actions(SB3_ZIP, obs)).reshape(-1)


@pytest.mark.parametrize(
    ("backend", "least"), [("ort", 1.0), ("gl33", 1.0), ("es31", 1.0), ("es2", 0.98)]
)
def test_shipped_policy_gives_sb3_actions_on_every_backend(
    backend: str, least: float, sb3_reference: tuple[np.ndarray, np.ndarray]
) -> None:
    if backend != "ort":
        try:
            context(backend)
        except GLUnavailable as e:
            if os.environ.get("SPLITEDGE_REQUIRE_GL") == "1":
                pytest.fail(f"SPLITEDGE_REQUIRE_GL=1 but {e}")
            pytest.skip(str(e))
    obs, want = sb3_reference
    bundle = load_bundle(ZOO_BUNDLE)
    encoder, why = make_encoder(bundle, backend)
    head = cpu_session(bundle.file(bundle.policy["head"]["onnx"]))
    got = head_actions(head, encoder.encode(obs))
    encoder.close()
    assert why.startswith(f"{backend}: requested")
    assert np.mean(got == want) >= least, f"{backend}: {np.mean(got == want):.4f} identical actions"


def test_auto_gives_a_one_line_reason() -> None:
    encoder, why = make_encoder(load_bundle(ZOO_BUNDLE), "auto")
    encoder.close()
    assert "\n" not in why and why.split(":")[0] in backends()


def test_bench_encoder_measures_every_backend_side_by_side(
    capsys: pytest.CaptureFixture[str],
) -> None:
    code = main(
        [
            "bench",
            "encoder",
            "--bundle",
            str(ZOO_BUNDLE),
            "--backends",
            "ort,gl33,es2,torch",
            "--batch",
            "1,2",
            "--seconds",
            "0.06",
            "--agreement",
            "16",
            "--json",
        ]
    )
    assert code == 0
    out = json.loads(capsys.readouterr().out)
    ran = {r["backend"] for r in out["backends"] if not r["how"].startswith("unavailable")}
    assert {"ort", "torch"} <= ran
    assert {(r["backend"], r["batch"]) for r in out["speed"]} == {
        (b, n) for b in ran for n in (1, 2)
    }
    for row in out["speed"]:
        assert row["ms_per_frame"] > 0 and row["frames_per_s"] == pytest.approx(
            1e3 / row["ms_per_frame"]
        )
    assert {r["backend"] for r in out["gl_fixed_overhead"]} == ran & {"gl33", "es2"}
    assert "ort_vs_torch_fps_batch1" in out
    fid = {r["backend"]: r for r in out["fidelity"]}
    assert fid["ort"]["features_identical_%"] == 100.0


def test_bench_rejects_bad_batches(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["bench", "encoder", "--bundle", str(ZOO_BUNDLE), "--batch", "0"]) == 2
    assert "--batch must be integers >= 1" in capsys.readouterr().err


def test_gl_encoder_runs_without_torch() -> None:
    code = NO_TORCH + (
        "from pathlib import Path; from splitedge.bundle import load_bundle; from edge.encoder import make_encoder;"
        "import numpy as np; b = load_bundle(Path('models/zoo/cartpole-ppo'));"
        "from edge.encoder.egl import GLUnavailable\n"
        "try:\n  enc, why = make_encoder(b, 'es2')\nexcept GLUnavailable:\n  enc, why = make_encoder(b, 'ort')\n"
        "print(enc.encode(np.zeros((1, 3, 48, 48), np.uint8)).shape)"
    )
    env = {**os.environ, "EGL_PLATFORM": "surfaceless"}
    r = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120
    )
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip().splitlines()[-1] == "(1, 64)"


def test_device_profile_limits_reach_the_gl_backend() -> None:
    from deploy.devices import load_profile

    try:
        context("es2")
    except GLUnavailable as e:
        pytest.skip(str(e))
    encoder, _ = make_encoder(
        load_bundle(Path(ZOO_BUNDLE)), "es2", limits=load_profile("pi-zero-2w").limits()
    )
    assert encoder.plan.limits.max_samples_per_pass == 64  # type: ignore[attr-defined]
    encoder.close()
