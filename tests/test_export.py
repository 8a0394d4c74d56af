"""Exported bundles act exactly like SB3's predict(deterministic=True)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnxruntime as ort

from edge.envs import make_env
from models.export import sb3_actions
from splitedge.bundle import load_bundle
from tests.conftest import ROOT, ZOO_BUNDLE


def _observations(task: str, n: int, seed: int = 7) -> np.ndarray:
    """n observations from random-action episodes (varied states, not just starts)."""
    env = make_env(task, seed=seed)
    obs, _ = env.reset(seed=seed)
    out = []
    for i in range(n):
        out.append(obs)
        obs, _, term, trunc, _ = env.step(env.action_space.sample())
        if term or trunc:
            obs, _ = env.reset(seed=seed + i)
    return np.stack(out)


def _split_and_full(bundle_dir: Path, obs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    enc = ort.InferenceSession(str(bundle_dir / "encoder.onnx"))
    head = ort.InferenceSession(str(bundle_dir / "head.onnx"))
    full = ort.InferenceSession(str(bundle_dir / "full.onnx"))
    feats = enc.run(None, {"observation": obs})[0]
    assert feats.dtype == np.uint8
    return head.run(None, {"features": feats})[0], full.run(None, {"observation": obs})[0]


def test_tiny_bundle_matches_sb3_predict(tiny_run: Path, tiny_bundle: Path) -> None:
    obs = _observations("cartpole-pixels", 256)
    ref = sb3_actions(tiny_run / "model.zip", obs)
    split, full = _split_and_full(tiny_bundle, obs)
    assert np.array_equal(split, ref)
    assert np.array_equal(full, ref)


def test_zoo_bundle_matches_its_sb3_model() -> None:
    obs = _observations("cartpole-pixels", 300, seed=3)
    ref = sb3_actions(ROOT / "models" / "zoo" / "cartpole-ppo.sb3.zip", obs)
    split, full = _split_and_full(ZOO_BUNDLE, obs)
    assert len(ref) >= 200
    assert np.array_equal(split, ref)
    assert np.array_equal(full, ref)


def test_manifest_records_training(tiny_bundle: Path) -> None:
    m = load_bundle(tiny_bundle).manifest
    p = m["policy"]
    assert p["observation"] == {"shape": [3, 48, 48], "dtype": "uint8", "layout": "CHW"}
    assert p["encoder"]["output"]["shape"] == [64]
    assert p["training"]["final_100_mean_return"] is not None
    assert set(m["files"]) == {
        "encoder.onnx",
        "head.onnx",
        "full.onnx",
        "encoder_ir.json",
        "encoder_weights.npz",
    }
    assert json.loads((tiny_bundle / "encoder_ir.json").read_text())["output"]["features"] == 64
