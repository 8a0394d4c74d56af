"""A policy bundle's server side: the feature/observation/action specs and the two ONNX models."""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from splitedge.bundle import Bundle, load_bundle
from splitedge.errors import SplitedgeError
from splitedge.onnx import cpu_session
from splitedge.realtime_spec import RealtimeSpec, realtime_spec

# discrete: head.onnx gives int64 (B,); continuous: float32 (B, *shape) inside [low, high]
ACTION_TYPES = ("discrete", "continuous")
# uint8: quantised with the bundle's scale/zero_point; float32: the encoder's values as they are
FEATURE_DTYPES = ("uint8", "float32")


@dataclass(frozen=True)
class Spec:
    """What a tensor must look like: shape without the batch dim, dtype, and quantisation."""

    shape: tuple[int, ...]
    dtype: str
    scale: float = 0.0
    zero_point: int = 0

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * np.dtype(self.dtype).itemsize

    @property
    def quantised(self) -> bool:
        """uint8 values that mean (q - zero_point) * scale; a float32 spec's scale is informative."""
        return self.dtype == "uint8"

    def describe(self) -> str:
        """e.g. 'uint8[64] scale 0.0314 zero_point 0', or 'float32[64]'."""
        text = f"{self.dtype}{list(self.shape)}"
        if self.quantised and self.scale:
            return f"{text} scale {self.scale:.6g} zero_point {self.zero_point}"
        return text


class OrtModel:
    """One ONNX model with `inputs` inputs (1, or 2 for a delay-aware head: features or
    observation, then actions in flight) and one output, batch dim first."""

    def __init__(self, path: Path, threads: int = 1, n_inputs: int = 1):
        try:
            self.session = cpu_session(path, threads)
        except Exception as e:  # onnxruntime raises several types for a broken file
            raise SplitedgeError(
                f"cannot load {path} with onnxruntime ({e}); rebuild the bundle"
            ) from e
        inputs, outputs = self.session.get_inputs(), self.session.get_outputs()
        want = "an input" if n_inputs == 1 else f"{n_inputs} inputs"
        if len(inputs) != n_inputs or len(outputs) != 1:
            raise SplitedgeError(
                f"{path} must have {want} and one output (the manifest's policy.realtime says "
                f"so), has {[i.name for i in inputs]} -> {[o.name for o in outputs]}"
            )
        self.path = path
        self.input_names = [i.name for i in inputs]
        self.input_name, self.output_name = inputs[0].name, outputs[0].name

    def __call__(self, batch: np.ndarray | tuple[np.ndarray, ...]) -> np.ndarray:
        """(B, ...) input (a tuple, one per input, for several) -> (B, ...) output."""
        parts = batch if isinstance(batch, tuple) else (batch,)
        feed = dict(zip(self.input_names, parts, strict=True))
        return np.asarray(self.session.run([self.output_name], feed)[0])


@dataclass
class PolicyModels:
    """Everything the server knows about its bundle: identity, specs and the head/full models."""

    bundle: Bundle
    digest: str
    features: Spec
    observation: Spec
    action: Spec
    action_type: str
    head: OrtModel
    full: OrtModel
    realtime: RealtimeSpec = RealtimeSpec()

    @property
    def history(self) -> Spec | None:
        """What a request's actions_in_flight must be (None: the head reads none)."""
        d = self.realtime.action_history
        return Spec((d, *self.action.shape), self.action.dtype) if d else None

    def output_shape(self, batch: int) -> tuple[int, ...]:
        """head.onnx's (and full.onnx's) output shape for a batch: (B, [H,] *action shape);
        a discrete action is one int64 per step, so its shape adds nothing."""
        chunk = (self.realtime.chunk_length,) if self.realtime.chunk_length > 1 else ()
        action = () if self.action_type == "discrete" else self.action.shape
        return (batch, *chunk, *action)

    @property
    def name(self) -> str:
        return self.bundle.name

    @property
    def version(self) -> str:
        return self.bundle.version

    @classmethod
    def load(cls, path: str | Path, ort_threads: int = 1) -> PolicyModels:
        """Open and verify a policy bundle and load head.onnx and full.onnx; SplitedgeError if unusable."""
        bundle = load_bundle(path)
        policy = bundle.policy  # SplitedgeError if this is not a policy bundle
        try:
            enc, obs, act = policy["encoder"], policy["observation"], policy["action"]
            out = enc["output"]
            features = Spec(
                _shape(out["shape"]), str(out["dtype"]), float(out["scale"]), int(out["zero_point"])
            )
            observation = Spec(_shape(obs["shape"]), str(obs["dtype"]))
            action = Spec(_shape(act.get("shape", [1])), str(act["dtype"]))
            digest, action_type = str(enc["digest"]), str(act["type"])
            head_file, full_file = policy["head"]["onnx"], policy["full"]["onnx"]
            realtime = realtime_spec(policy, f"bundle {path}")
        except (KeyError, TypeError, ValueError) as e:
            raise SplitedgeError(
                f"bundle {path}: manifest policy section is incomplete ({e!r}); "
                "re-export it with `splitedge export`"
            ) from e
        if features.dtype not in FEATURE_DTYPES:
            raise SplitedgeError(
                f"bundle {path}: features must be uint8 or float32, got {features.dtype!r}; "
                "re-export it with `splitedge export`"
            )
        if observation.dtype != "uint8":
            raise SplitedgeError(
                f"bundle {path}: observations must be uint8, got {observation.dtype!r}"
            )
        if action_type not in ACTION_TYPES:
            raise SplitedgeError(
                f"bundle {path}: action type must be one of {ACTION_TYPES}, got {action_type!r}"
            )
        if features.quantised and not (math.isfinite(features.scale) and features.scale > 0):
            raise SplitedgeError(
                f"bundle {path}: uint8 feature scale must be > 0, got {features.scale}"
            )
        if not (math.isfinite(features.scale) and features.scale >= 0):
            raise SplitedgeError(f"bundle {path}: feature scale must be >= 0, got {features.scale}")
        if realtime.action_history and action_type == "discrete" and action.shape != (1,):
            raise SplitedgeError(f"bundle {path}: a discrete action's shape must be [1]")
        inputs = 2 if realtime.action_history else 1
        models = cls(
            bundle,
            digest,
            features,
            observation,
            action,
            action_type,
            OrtModel(bundle.file(head_file), ort_threads, inputs),
            OrtModel(bundle.file(full_file), ort_threads, inputs),
            realtime,
        )
        models.warm_up()
        return models

    def warm_up(self) -> None:
        """Run each model once on zeros, so the first client does not pay for lazy
        initialisation, and check its output is the (B, [H,] *action) the manifest says."""
        history = self.history
        for model, spec in ((self.head, self.features), (self.full, self.observation)):
            batch: Any = np.zeros((1, *spec.shape), spec.dtype)
            what = f"a {spec.describe()} batch"
            if history is not None:
                batch = (batch, np.zeros((1, *history.shape), history.dtype))
                what += f" with {history.describe()} actions in flight"
            try:
                out = model(batch)
            except Exception as e:
                raise SplitedgeError(
                    f"{model.path} does not accept {what} ({e}); the bundle's manifest "
                    "and models disagree"
                ) from e
            if out.shape != self.output_shape(1):
                raise SplitedgeError(
                    f"{model.path} answers shape {list(out.shape)} where the manifest "
                    f"({self.realtime.describe()}, action {list(self.action.shape)}) means "
                    f"{list(self.output_shape(1))}; re-export the bundle"
                )


def _shape(value: Any) -> tuple[int, ...]:
    shape = tuple(int(d) for d in value)
    if not shape or any(d < 1 for d in shape):
        raise ValueError(f"bad shape {value!r}")
    return shape
