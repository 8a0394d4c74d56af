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
    """One ONNX model with one input and one output, batch dim first."""

    def __init__(self, path: Path, threads: int = 1):
        try:
            self.session = cpu_session(path, threads)
        except Exception as e:  # onnxruntime raises several types for a broken file
            raise SplitedgeError(
                f"cannot load {path} with onnxruntime ({e}); rebuild the bundle"
            ) from e
        inputs, outputs = self.session.get_inputs(), self.session.get_outputs()
        if len(inputs) != 1 or len(outputs) != 1:
            raise SplitedgeError(
                f"{path} must have exactly one input and one output, has "
                f"{[i.name for i in inputs]} -> {[o.name for o in outputs]}"
            )
        self.path = path
        self.input_name, self.output_name = inputs[0].name, outputs[0].name

    def __call__(self, batch: np.ndarray) -> np.ndarray:
        """(B, ...) input -> (B, ...) output."""
        return np.asarray(self.session.run([self.output_name], {self.input_name: batch})[0])


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
        models = cls(
            bundle,
            digest,
            features,
            observation,
            action,
            action_type,
            OrtModel(bundle.file(head_file), ort_threads),
            OrtModel(bundle.file(full_file), ort_threads),
        )
        models.warm_up()
        return models

    def warm_up(self) -> None:
        """Run each model once on zeros, so the first client does not pay for lazy initialisation."""
        for model, spec in ((self.head, self.features), (self.full, self.observation)):
            try:
                model(np.zeros((1, *spec.shape), spec.dtype))
            except Exception as e:
                raise SplitedgeError(
                    f"{model.path} does not accept a {spec.describe()} batch "
                    f"({e}); the bundle's manifest and models disagree"
                ) from e


def _shape(value: Any) -> tuple[int, ...]:
    shape = tuple(int(d) for d in value)
    if not shape or any(d < 1 for d in shape):
        raise ValueError(f"bad shape {value!r}")
    return shape
