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

from models.algos import ALGOS, DISCRETE_ALGOS, actor_encoder, actor_head
from models.encoders import MiniConv, MiniConvExtractor
from splitedge import __version__, ir
from splitedge.bundle import write_manifest
from splitedge.errors import SplitedgeError

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
    """uint8 features (B, F) -> deterministic action, as SB3's predict(deterministic=True).

    PPO: argmax of the logits, int64 (B,). SAC/DDPG: the squashed actor output in [-1, 1]
    unscaled to the Box's [low, high] as BasePolicy.predict does, float32 (B, n_actions).
    """

    def __init__(self, algo: str, policy: Any, scale: float):
        super().__init__()
        self.discrete, self.scale = algo in DISCRETE_ALGOS, scale
        self.actor = actor_head(algo, policy)
        if not self.discrete:
            space = policy.action_space
            self.register_buffer("low", torch.as_tensor(space.low, dtype=torch.float32))
            self.register_buffer("high", torch.as_tensor(space.high, dtype=torch.float32))

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        f = features.to(torch.float32) * self.scale  # (B, F)
        out = self.actor(f)  # (B, n): logits, or an action in [-1, 1]
        if self.discrete:
            return torch.argmax(out, dim=1)  # (B,)
        return self.low + (0.5 * (out + 1.0) * (self.high - self.low))  # (B, n)


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
    from edge.encoder.calibrate import EXTRA_KEY, calibrate, to_extra
    from models.qat import calibration_frames  # the frames es2 training finishes on

    scales = to_extra(calibrate(enc_ir, weights, calibration_frames(task)))
    return replace(enc_ir, extra={**enc_ir.extra, EXTRA_KEY: scales})


def _git_commit() -> str:
    try:
        return subprocess.run(
            ["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=True, timeout=5
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def algorithm_of(model_zip: Path) -> str:
    """The algorithm that saved model_zip: result.json's config.algo, else its policy class."""
    result_path = model_zip.parent / "result.json"
    if result_path.exists():
        algo = json.loads(result_path.read_text()).get("config", {}).get("algo")
        if algo is not None:
            if algo not in ALGOS:
                raise SplitedgeError(
                    f"{result_path} says algo {algo!r}; export supports {', '.join(ALGOS)}"
                )
            return str(algo)
    from stable_baselines3.common.policies import ActorCriticPolicy
    from stable_baselines3.common.save_util import load_from_zip_file
    from stable_baselines3.sac.policies import SACPolicy
    from stable_baselines3.td3.policies import TD3Policy

    try:
        data, _, _ = load_from_zip_file(model_zip, device="cpu", load_data=True)
    except Exception as e:  # SB3 raises several types for a file that is not its zip
        raise SplitedgeError(f"{model_zip} is not an SB3 model.zip ({e})") from e
    policy_class = (data or {}).get("policy_class")
    for base, algo in ((ActorCriticPolicy, "ppo"), (SACPolicy, "sac"), (TD3Policy, "ddpg")):
        if isinstance(policy_class, type) and issubclass(policy_class, base):
            return algo
    raise SplitedgeError(
        f"{model_zip}: cannot tell its algorithm (policy class {policy_class!r}); "
        f"export supports {', '.join(ALGOS)} models saved by `splitedge train`"
    )


def load_model(model_zip: Path) -> tuple[Any, str]:
    """(the SB3 model, its algorithm name) for a model.zip, on the CPU."""
    import stable_baselines3

    import models.algos  # noqa: F401  (the off-policy policy classes the zip refers to)

    algo = algorithm_of(model_zip)
    try:
        return getattr(stable_baselines3, algo.upper()).load(model_zip, device="cpu"), algo
    except Exception as e:  # a broken or foreign zip fails in many ways inside SB3
        raise SplitedgeError(
            f"cannot load {model_zip} as an SB3 {algo.upper()} model ({type(e).__name__}: {e})"
        ) from e


def _split_encoder(algo: str, policy: Any, model_zip: Path) -> MiniConv:
    """The MiniConv the deployed actor runs; SplitedgeError for an encoder that is not split."""
    extractor = actor_encoder(algo, policy)
    if not isinstance(extractor, MiniConvExtractor):
        raise SplitedgeError(
            f"{model_zip} uses a {type(extractor).__name__} encoder, which has no device "
            "(shader) form; train with `--encoder miniconv` (or miniconv-es2) to export a bundle"
        )
    return extractor.encoder


def _action_spec(algo: str, space: Any) -> dict[str, Any]:
    if algo in DISCRETE_ALGOS:
        return {"type": "discrete", "n": int(space.n), "dtype": "int64", "shape": [1]}
    return {
        "type": "continuous",
        "shape": [int(d) for d in space.shape],
        "dtype": "float32",
        "low": [float(v) for v in np.asarray(space.low, np.float32).reshape(-1)],
        "high": [float(v) for v in np.asarray(space.high, np.float32).reshape(-1)],
    }


def export_policy(model_zip: Path, out: Path, name: str, version: str) -> dict[str, Any]:
    """Build a policy bundle in `out` from an SB3 model.zip (result.json beside it is recorded)."""
    model, algo = load_model(model_zip)
    policy = model.policy.eval()
    encoder = _split_encoder(algo, policy, model_zip)
    weights = encoder.weights()
    result_path = model_zip.parent / "result.json"
    result = json.loads(result_path.read_text()) if result_path.exists() else {}
    task = result.get("config", {}).get("task", "cartpole-pixels" if algo == "ppo" else None)
    if task is None:  # es2 calibration needs the task's frames
        raise SplitedgeError(
            f"no result.json with config.task beside {model_zip}; export a run directory "
            "written by `splitedge train`"
        )
    enc_ir = with_es2_scales(encoder.ir, weights, task)
    out.mkdir(parents=True, exist_ok=True)
    (out / "encoder_ir.json").write_text(enc_ir.to_json() + "\n")
    (out / "encoder_weights.npz").write_bytes(ir.save_weights(weights))

    obs_shape = tuple(int(d) for d in model.observation_space.shape)
    enc_graph = EncoderGraph(encoder)
    head_graph = HeadGraph(algo, policy, enc_ir.output_scale)
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
            "algorithm": algo,
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
            "action": _action_spec(algo, space),
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
    model, _ = load_model(model_zip)
    actions, _ = model.predict(observations, deterministic=True)
    return np.asarray(actions)
