"""onnxruntime CPU encoder: runs the bundle's encoder.onnx."""

from __future__ import annotations

from typing import Any

import numpy as np

from edge.encoder import register_backend
from splitedge.errors import SplitedgeError
from splitedge.onnx import cpu_session

# onnxruntime's names for the feature dtypes a bundle may declare
_ORT_TYPES = {"uint8": "tensor(uint8)", "float32": "tensor(float)"}


class OrtEncoder:
    """encoder.onnx through onnxruntime on the CPU: features exactly as the exported graph gives them."""

    name = "ort"

    def __init__(self, bundle: Any, threads: int = 1):
        enc = bundle.policy["encoder"]
        path = bundle.file(enc["onnx"])
        self.session = cpu_session(path, threads)
        self.input_name = self.session.get_inputs()[0].name
        dtype = str(enc["output"]["dtype"])
        got = self.session.get_outputs()[0].type
        if _ORT_TYPES.get(dtype) != got:
            raise SplitedgeError(
                f"{path} outputs {got} but the manifest says the features are {dtype}; "
                "re-export the bundle with `splitedge export`"
            )

    def encode(self, observations: np.ndarray) -> np.ndarray:
        """uint8 (B, C, H, W) -> (B, F) in the bundle's feature dtype (uint8 or float32)."""
        return np.asarray(self.session.run(None, {self.input_name: observations})[0])

    def close(self) -> None:
        pass


@register_backend("ort")
def make(bundle: Any, **kwargs: Any) -> OrtEncoder:
    return OrtEncoder(bundle, **kwargs)
