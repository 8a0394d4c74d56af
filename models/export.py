"""Export a trained SB3 split policy to a bundle: IR + weights, encoder/head/full ONNX, manifest."""

from __future__ import annotations

import json
import subprocess
import time
import warnings
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from models.encoders import MiniConv
from splitedge import __version__, ir
from splitedge.bundle import write_manifest

OPSET = 17


class EncoderGraph(nn.Module):
    """uint8 (B, C, H, W) -> uint8 features (B, F): the /255 SB3 does, the encoder, quantisation."""

    def __init__(self, encoder: MiniConv):
        super().__init__()
        self.encoder = encoder

    def forward(self, obs: torch.Tensor) -> torch.Tensor:
        x = obs.to(torch.float32) * self.encoder.ir.input_scale
        return self.encoder.quant.to_uint8(self.encoder.net(x).flatten(1))


class HeadGraph(nn.Module):
    """uint8 features (B, F) -> deterministic action (B,) int64 for discrete spaces."""

    def __init__(self, policy: Any, scale: float):
        super().__init__()
        self.policy, self.scale = policy, scale

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        f = features.to(torch.float32) * self.scale
        latent = self.policy.mlp_extractor.forward_actor(f)
        return torch.argmax(self.policy.action_net(latent), dim=1)


class FullGraph(nn.Module):
    """uint8 observation -> action: the whole policy, as the raw-offload server runs it."""

    def __init__(self, encoder: EncoderGraph, head: HeadGraph):
        super().__init__()
        self.encoder, self.head = encoder, head

    def forward(self, obs: torch.Tensor) -> torch.Tensor:
        return self.head(self.encoder(obs))


def _export(
    module: nn.Module, example: torch.Tensor, path: Path, in_name: str, out_name: str
) -> None:
    module.eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            module,
            (example,),
            str(path),
            input_names=[in_name],
            output_names=[out_name],
            dynamic_axes={in_name: {0: "batch"}, out_name: {0: "batch"}},
            opset_version=OPSET,
            dynamo=False,
        )


def with_es2_scales(
    enc_ir: ir.EncoderIR, weights: dict[str, np.ndarray], task: str
) -> ir.EncoderIR:
    """The IR with per-layer 8-bit activation scales for es2, calibrated on the task's frames.

    Recorded at export so every device stores activations on the same grid (and the
    encoder digest covers it), instead of each device calibrating on its own at load.
    """
    from edge.encoder.calibrate import EXTRA_KEY, calibrate, task_frames, to_extra

    scales = to_extra(calibrate(enc_ir, weights, task_frames(task)))
    return replace(enc_ir, extra={**enc_ir.extra, EXTRA_KEY: scales})


def _git_commit() -> str:
    try:
        return subprocess.run(
            ["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=True, timeout=5
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def export_policy(model_zip: Path, out: Path, name: str, version: str) -> dict[str, Any]:
    """Build a policy bundle in `out` from an SB3 model.zip (result.json beside it is recorded)."""
    from stable_baselines3 import PPO

    model = PPO.load(model_zip, device="cpu")
    policy = model.policy.eval()
    encoder: MiniConv = policy.features_extractor.encoder
    weights = encoder.weights()
    result_path = model_zip.parent / "result.json"
    result = json.loads(result_path.read_text()) if result_path.exists() else {}
    task = result.get("config", {}).get("task", "cartpole-pixels")
    enc_ir = with_es2_scales(encoder.ir, weights, task)
    out.mkdir(parents=True, exist_ok=True)
    (out / "encoder_ir.json").write_text(enc_ir.to_json() + "\n")
    (out / "encoder_weights.npz").write_bytes(ir.save_weights(weights))

    obs_shape = tuple(int(d) for d in model.observation_space.shape)
    enc_graph = EncoderGraph(encoder)
    head_graph = HeadGraph(policy, enc_ir.output_scale)
    example_obs = torch.zeros((1, *obs_shape), dtype=torch.uint8)
    example_feat = torch.zeros((1, enc_ir.feature_count), dtype=torch.uint8)
    _export(enc_graph, example_obs, out / "encoder.onnx", "observation", "features")
    _export(head_graph, example_feat, out / "head.onnx", "features", "action")
    _export(
        FullGraph(enc_graph, head_graph), example_obs, out / "full.onnx", "observation", "action"
    )

    space = model.action_space
    manifest = {
        "kind": "policy",
        "name": name,
        "version": version,
        "created": {
            "at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "training_command": result.get("command", "unknown"),
            "git_commit": _git_commit(),
            "splitedge_version": __version__,
        },
        "policy": {
            "task": task,
            "algorithm": "ppo",
            "observation": {"shape": list(obs_shape), "dtype": "uint8", "layout": "CHW"},
            "encoder": {
                "ir": "encoder_ir.json",
                "weights": "encoder_weights.npz",
                "onnx": "encoder.onnx",
                "digest": ir.digest(enc_ir, weights),
                "output": {
                    "shape": [enc_ir.feature_count],
                    "dtype": "uint8",
                    "scale": enc_ir.output_scale,
                    "zero_point": enc_ir.output_zero_point,
                },
            },
            "head": {"onnx": "head.onnx"},
            "full": {"onnx": "full.onnx"},
            "action": {"type": "discrete", "n": int(space.n), "dtype": "int64", "shape": [1]},
            "training": {
                k: result.get(k)
                for k in (
                    "config",
                    "timesteps",
                    "train_seconds",
                    "final_100_mean_return",
                    "deterministic_eval_mean_return",
                    "random_policy_mean_return",
                )
            },
        },
    }
    return write_manifest(out, manifest)


def sb3_actions(model_zip: Path, observations: np.ndarray) -> np.ndarray:
    """SB3's deterministic actions for a batch of uint8 observations (reference for tests)."""
    from stable_baselines3 import PPO

    model = PPO.load(model_zip, device="cpu")
    actions, _ = model.predict(observations, deterministic=True)
    return np.asarray(actions)
