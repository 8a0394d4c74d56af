"""onnxruntime CPU encoder: runs the bundle's encoder.onnx."""

from __future__ import annotations

from typing import Any

import numpy as np

from edge.encoder import register_backend
from splitedge.onnx import cpu_session


class OrtEncoder:
    """encoder.onnx through onnxruntime on the CPU."""

    name = "ort"

    def __init__(self, bundle: Any, threads: int = 1):
        enc = bundle.policy["encoder"]
        self.session = cpu_session(bundle.file(enc["onnx"]), threads)
        self.input_name = self.session.get_inputs()[0].name

    def encode(self, observations: np.ndarray) -> np.ndarray:
        return np.asarray(self.session.run(None, {self.input_name: observations})[0])

    def close(self) -> None:
        pass


@register_backend("ort")
def make(bundle: Any, **kwargs: Any) -> OrtEncoder:
    return OrtEncoder(bundle, **kwargs)
