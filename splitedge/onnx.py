"""onnxruntime session settings shared by the device runtime and the server."""

from __future__ import annotations

from pathlib import Path
from typing import Any


def cpu_session(path: str | Path, threads: int = 1) -> Any:
    """A CPU onnxruntime session for small per-call models: few threads, no spinning between calls."""
    import onnxruntime as ort  # lazily: the CLI core must import without onnxruntime

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    # Spinning threads burn a core between decisions; on a Pi Zero that core is the encoder's.
    opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
