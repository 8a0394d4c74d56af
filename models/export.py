"""Export a user's SB3 image policy to a bundle, and prove the bundle acts like the model.

The model is read for what it is (models/sb3_policy.py): any PPO / A2C / SAC / TD3 / DDPG
image policy whose features extractor starts with a conv stack. Observations for the
feature scale, the es2 activation scales and the self-check come from the user's env or
a frames file, never from a task we guess. Before anything is written, the bundle's
encoder + head (onnxruntime) must give `predict(deterministic=True)`'s actions: discrete
identical, continuous within 1e-4. Features cross the wire as uint8 when that holds with
a calibrated scale, else as float32 (said in the output and the manifest). A model
trained to hide link latency (delay-aware or chunks) is exported with the changes
models/realtime_export.py lists, and its manifest gains `policy.realtime`.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import tempfile
import time
import warnings
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from models.delay_wrapper import IN_FLIGHT_KEY
from models.observations import Observations, gather
from models.proof import describe, passes, prove, rounding_only, uint8_margin
from models.realtime_export import (
    HISTORY_INPUT,
    HeadIO,
    example_history,
    gather_realtime,
    read_delay_aware,
    realtime_record,
    spec_of,
    tick_action_space,
)
from models.sb3_policy import Actor, check_split, load_model, predict, read_actor
from splitedge import __version__, ir
from splitedge.bundle import MANIFEST, write_manifest
from splitedge.errors import SplitedgeError
from splitedge.realtime_spec import RealtimeSpec

OPSET = 17
FEATURE_DTYPES = ("auto", "uint8", "float32")
__all__ = ["export_policy", "load_model", "sb3_actions"]


class EncoderGraph(nn.Module):
    """uint8 (B, C, H, W) -> features (B, F): SB3's input scaling, the conv stack, and
    uint8 quantisation q = clip(round(x / scale) + zero_point, 0, 255) unless float32."""

    def __init__(self, actor: Actor, enc_ir: ir.EncoderIR):
        super().__init__()
        self.net, self.input_scale = actor.encoder.net, actor.input_scale
        self.quantise = enc_ir.output_dtype == "uint8"
        self.scale, self.zero_point = enc_ir.output_scale, enc_ir.output_zero_point

    def forward(self, obs: torch.Tensor) -> torch.Tensor:
        f = self.net(obs.to(torch.float32) * self.input_scale).flatten(1)  # (B, F)
        if not self.quantise:
            return f
        q = torch.round(f / self.scale) + self.zero_point
        return torch.clamp(q, 0.0, 255.0).to(torch.uint8)


class HeadGraph(nn.Module):
    """features (B, F) -> predict(deterministic=True)'s action: argmax int64 (B,) for a
    discrete space, float32 (B, n) in the Box's bounds for a continuous one; a delay-aware
    head also reads the actions in flight, a chunking one answers (B, H, ...)."""

    def __init__(self, actor: Actor, enc_ir: ir.EncoderIR, io: HeadIO):
        super().__init__()
        self.post, self.head, self.io = actor.post, actor.head, io
        self.dequantise = enc_ir.output_dtype == "uint8"
        self.scale, self.zero_point = enc_ir.output_scale, enc_ir.output_zero_point

    def forward(self, features: torch.Tensor, history: torch.Tensor | None = None) -> torch.Tensor:
        f = features.to(torch.float32)
        if self.dequantise:
            f = (f - self.zero_point) * self.scale
        x = self.post(f)
        if history is not None:  # after the features, as InFlightExtractor appends them
            x = torch.cat([x, self.io.encode_history(history)], dim=1)
        return self.io.shape_output(self.head(x))


class FullGraph(nn.Module):
    """uint8 observation -> action: the whole policy, as the raw-offload server runs it."""

    def __init__(self, encoder: EncoderGraph, head: HeadGraph):
        super().__init__()
        self.encoder, self.head = encoder, head

    def forward(self, obs: torch.Tensor, history: torch.Tensor | None = None) -> torch.Tensor:
        return self.head(self.encoder(obs), history)


def _export(
    module: nn.Module, examples: tuple[torch.Tensor, ...], path: Path, names: tuple[str, ...]
) -> None:
    """`module` on `examples` to ONNX: inputs named names[:-1], the output names[-1]."""
    module.eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            module,
            examples,
            str(path),
            input_names=list(names[:-1]),
            output_names=[names[-1]],
            dynamic_axes={name: {0: "batch"} for name in names},
            opset_version=OPSET,
            dynamo=False,
        )


def _git_commit() -> str:
    try:
        return subprocess.run(
            ["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=True, timeout=5
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def _output_grid(actor: Actor, frames: np.ndarray) -> tuple[float, int]:
    """(scale, zero_point) of the uint8 feature grid: the trained one, or calibrated."""
    if actor.trained_quantised:
        return actor.encoder.ir.output_scale, actor.encoder.ir.output_zero_point
    with torch.no_grad():
        x = torch.as_tensor(frames).float() * actor.input_scale
        f = actor.encoder.net(x)
    lo, hi = min(float(f.min()), 0.0), max(float(f.max()), 0.0)
    scale = (hi - lo) / 255.0 if hi > lo else 1.0
    return scale, int(np.clip(round(-lo / scale), 0, 255))


def _encoder_ir(actor: Actor, dtype: str, frames: np.ndarray) -> ir.EncoderIR:
    """The IR with its output grid (uint8, or es2's last-stage storage for float32) and the
    es2 per-stage activation scales, both calibrated on the user's observations."""
    from edge.encoder.calibrate import EXTRA_KEY, calibrate, to_extra

    scale, zero_point = _output_grid(actor, frames)
    base = replace(
        actor.encoder.ir,
        input_scale=actor.input_scale,
        output_scale=scale,
        output_zero_point=zero_point,
        output_dtype=dtype,
    )
    weights = actor.encoder.weights()
    scales = to_extra(calibrate(base, weights, frames))
    return replace(base, extra={**base.extra, EXTRA_KEY: scales})


def _write_onnx(
    actor: Actor, enc_ir: ir.EncoderIR, out: Path, spec: RealtimeSpec, tick_space: Any
) -> None:
    enc, head = EncoderGraph(actor, enc_ir), HeadGraph(actor, enc_ir, HeadIO(spec, tick_space))
    feat_dtype = torch.uint8 if enc_ir.output_dtype == "uint8" else torch.float32
    obs = torch.zeros((1, enc_ir.channels, enc_ir.height, enc_ir.width), dtype=torch.uint8)
    feat = torch.zeros((1, enc_ir.feature_count), dtype=feat_dtype)
    history = example_history(spec, tick_space)
    extra, names = ((history,), (HISTORY_INPUT,)) if history is not None else ((), ())
    _export(enc, (obs,), out / "encoder.onnx", ("observation", "features"))
    _export(head, (feat, *extra), out / "head.onnx", ("features", *names, "action"))
    full = FullGraph(enc, head)
    _export(full, (obs, *extra), out / "full.onnx", ("observation", *names, "action"))


def _action_spec(space: Any) -> dict[str, Any]:
    if hasattr(space, "n"):
        return {"type": "discrete", "n": int(space.n), "dtype": "int64", "shape": [1]}
    return {
        "type": "continuous",
        "shape": [int(d) for d in space.shape],
        "dtype": "float32",
        "low": [float(v) for v in np.asarray(space.low, np.float32).reshape(-1)],
        "high": [float(v) for v in np.asarray(space.high, np.float32).reshape(-1)],
    }


def _stage_dir(out: Path) -> Path:
    """A fresh staging directory beside `out`; refuses an `out` that holds something else."""
    if out.exists() and (
        not out.is_dir() or (any(out.iterdir()) and not (out / MANIFEST).exists())
    ):
        raise SplitedgeError(
            f"--out {out} exists and is not a bundle directory; name a new or empty directory"
        )
    out.parent.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))


def _publish(stage: Path, out: Path) -> None:
    """Move the staged bundle to `out`; an earlier bundle there is replaced only once it can be."""
    old = out.with_name(f".{out.name}.old") if out.exists() else None
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
        out.rename(old)  # an earlier bundle at this path (checked in _stage_dir)
    try:
        stage.rename(out)
    except OSError:
        if old is not None:
            old.rename(out)
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def export_policy(
    model_zip: Path,
    out: Path,
    name: str,
    version: str,
    *,
    env: str | None = None,
    env_kwargs: dict[str, Any] | None = None,
    frames: Path | None = None,
    features: str = "auto",
    algo: str | None = None,
    report: list[str] | None = None,
    check: Callable[[Path], str] | None = None,
) -> dict[str, Any]:
    """Build a proven policy bundle in `out` from an SB3 model.zip; nothing is written on refusal."""
    if features not in FEATURE_DTYPES:
        raise SplitedgeError(f"--features {features!r}: choose one of {', '.join(FEATURE_DTYPES)}")
    say = report.append if report is not None else (lambda _line: None)
    model, algo = load_model(model_zip, algo)
    result_path = model_zip.parent / "result.json"
    result = json.loads(result_path.read_text()) if result_path.exists() else {}
    record = realtime_record(model, result)  # None: a plain policy
    spec = spec_of(record)
    actor = read_delay_aware(model, algo) if spec.action_history else read_actor(model, algo)
    tick_space = tick_action_space(model, spec)
    task = result.get("config", {}).get("task")
    if env_kwargs is None and env in (None, task):  # the kwargs its run trained with
        env_kwargs = result.get("config", {}).get("env_kwargs") or None
    extra: dict[str, np.ndarray] = {}
    if record is not None and frames is None:
        if not (env or task):
            raise SplitedgeError("export needs the model's env: pass --env ID_OR_ENTRY_POINT")
        data, extra, check_obs = gather_realtime(
            model, str(env or task), dict(env_kwargs or {}), record, tick_space
        )
    elif spec.action_history:
        raise SplitedgeError(
            "a delay-aware model needs rollouts in its env for the actions in flight; pass "
            "--env instead of --frames"
        )
    else:
        data = gather(model, env or task, env_kwargs, frames)
        check_obs = data.check
    split_err = check_split(actor, data.calibration)
    if split_err > 1e-4:
        raise SplitedgeError(
            f"{actor.extractor_name}.forward is not its conv stack followed by its other layers "
            f"(max |diff| {split_err:.3g}); export cannot cut it exactly"
        )
    want = predict(model, check_obs)
    weights = actor.encoder.weights()
    tries = ["uint8", "float32"] if features == "auto" else [features]
    stage = _stage_dir(out)
    try:
        for dtype in tries:
            enc_ir = _encoder_ir(actor, dtype, data.calibration)
            if features == "auto" and dtype == "uint8":
                safe, detail = uint8_margin(actor, enc_ir, data.check, _in_flight(check_obs))
                if not safe:
                    say(f"features uint8: {detail}")
                    continue
            _write_onnx(actor, enc_ir, stage, spec, tick_space)
            agreement = prove(stage, enc_ir, weights, data.check, want, tick_space, extra)
            if passes(agreement):
                break
            rounding = None
            if dtype == "uint8":
                rounding = rounding_only(actor, stage, data.check, want, tick_space, extra)
            if rounding is not None:
                agreement["feature_rounding"] = rounding
                say(
                    f"features uint8: {describe(agreement)} agree with predict; the rest differ "
                    f"only by {rounding['feature_values_one_step_off']} of "
                    f"{rounding['feature_values']} feature values rounding to the next uint8 "
                    "step (float rounding at a half step), and the head on torch's own "
                    "features agrees everywhere"
                )
                break
            say(f"features {dtype}: {describe(agreement)} agree with predict")
        else:
            raise SplitedgeError(
                f"the bundle does not act like {model_zip.name}'s predict on {len(want)} "
                f"observations ({describe(agreement)}); nothing written"
            )
        if dtype != tries[0]:
            say(f"uint8 features could change the model's actions, so features cross as {dtype}")
        (stage / "encoder_ir.json").write_text(enc_ir.to_json() + "\n")
        (stage / "encoder_weights.npz").write_bytes(ir.save_weights(weights))
        if check is not None:  # a device profile's limits: refuse before anything is published
            say(check(stage))
        manifest = _manifest(actor, enc_ir, weights, name, version, result, task, data, agreement)
        manifest["policy"]["action"] = _action_spec(tick_space)  # one tick's, chunk or not
        if record is not None:
            manifest["policy"]["realtime"] = spec.to_manifest()
        manifest = write_manifest(stage, manifest)
        _publish(stage, out)
    finally:
        if stage.exists():
            shutil.rmtree(stage, ignore_errors=True)
    return manifest


def _in_flight(check_obs: Any) -> np.ndarray | None:
    """A delay-aware check set's actions in flight, flattened as the head reads them."""
    if not isinstance(check_obs, dict):
        return None
    flight = np.asarray(check_obs[IN_FLIGHT_KEY], np.float32)
    return flight.reshape(len(flight), -1)


def _manifest(
    actor: Actor,
    enc_ir: ir.EncoderIR,
    weights: dict[str, np.ndarray],
    name: str,
    version: str,
    result: dict[str, Any],
    task: str | None,
    data: Observations,
    check: dict[str, Any],
) -> dict[str, Any]:
    shape = [enc_ir.channels, enc_ir.height, enc_ir.width]
    item = 1 if enc_ir.output_dtype == "uint8" else 4
    split_b, raw_b = enc_ir.feature_count * item, int(np.prod(shape))
    return {
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
            "env": data.env,
            "algorithm": actor.algo,
            "features_extractor": actor.extractor_name,
            "observation": {"shape": shape, "dtype": "uint8", "layout": "CHW"},
            "encoder": {
                "ir": "encoder_ir.json",
                "weights": "encoder_weights.npz",
                "onnx": "encoder.onnx",
                "digest": ir.digest(enc_ir, weights),
                "output": {
                    "shape": [enc_ir.feature_count],
                    "dtype": enc_ir.output_dtype,
                    "scale": enc_ir.output_scale,
                    "zero_point": enc_ir.output_zero_point,
                },
            },
            "head": {"onnx": "head.onnx"},
            "full": {"onnx": "full.onnx"},
            "action": _action_spec(actor.model.action_space),
            "wire": {
                "split_bytes": split_b,
                "raw_bytes": raw_b,
                "raw_over_split": round(raw_b / split_b, 2),
            },
            "calibration": {"source": data.source, "observations": len(data.calibration)},
            "agreement": check,
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


def sb3_actions(model_zip: Path, observations: np.ndarray) -> np.ndarray:
    """SB3's deterministic actions for a batch of uint8 observations (reference for tests)."""
    model, _ = load_model(model_zip)
    return predict(model, observations)
