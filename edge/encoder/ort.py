"""onnxruntime CPU encoder: runs the bundle's encoder.onnx."""

from __future__ import annotations

from typing import Any

import numpy as np
import onnxruntime as ort

from edge.encoder import register_backend


def cpu_session(path: Any, threads: int = 1) -> ort.InferenceSession:
    """A CPU session tuned for small per-frame models: few threads, no spinning."""
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


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
