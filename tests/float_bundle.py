"""A float32-feature policy bundle made from the shipped uint8 one, for tests.

The encoder is the zoo bundle's MiniConv exported without quantisation (float32 features);
the head is the zoo head with its uint8 input and its `* scale` removed, so on dequantised
features q * scale it gives exactly the zoo head's action on q. full.onnx is the zoo's.
"""

from __future__ import annotations

import json
import shutil
import warnings
from dataclasses import replace
from pathlib import Path

import numpy as np

from splitedge import ir

ZOO_BUNDLE = Path(__file__).resolve().parents[1] / "models" / "zoo" / "cartpole-ppo"


def float_encoder_onnx(enc_ir: ir.EncoderIR, weights: dict[str, np.ndarray], path: Path) -> None:
    """encoder.onnx: uint8 (B, C, H, W) -> float32 features (B, F), no quantisation."""
    import torch
    from torch import nn

    from models.encoders import MiniConv

    class FloatEncoder(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.encoder = MiniConv.from_weights(enc_ir, weights)

        def forward(self, obs: torch.Tensor) -> torch.Tensor:
            x = obs.to(torch.float32) * enc_ir.input_scale  # what SB3 does: /255
            return self.encoder.net(x).flatten(1)  # (B, F) float32, as the network computes it

    example = torch.zeros((1, enc_ir.channels, enc_ir.height, enc_ir.width), dtype=torch.uint8)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            FloatEncoder().eval(),
            (example,),
            str(path),
            input_names=["observation"],
            output_names=["features"],
            dynamic_axes={"observation": {0: "batch"}, "features": {0: "batch"}},
            opset_version=17,
            dynamo=False,
        )


def float_head_onnx(uint8_head: Path, path: Path) -> None:
    """head.onnx taking float32 features: the uint8 head minus its leading Cast and Mul(scale)."""
    import onnx

    model = onnx.load(str(uint8_head))
    graph = model.graph
    cast, const, mul = graph.node[:3]
    if (cast.op_type, const.op_type, mul.op_type) != ("Cast", "Constant", "Mul"):
        raise ValueError(f"{uint8_head} does not start with Cast, Constant, Mul")
    features = graph.input[0].name
    for node in graph.node[3:]:
        for i, name in enumerate(node.input):
            if name == mul.output[0]:
                node.input[i] = features
    for node in (cast, const, mul):
        graph.node.remove(node)
    graph.input[0].type.tensor_type.elem_type = onnx.TensorProto.FLOAT
    onnx.checker.check_model(model)
    onnx.save(model, str(path))


def build_float_bundle(out: Path, source: Path = ZOO_BUNDLE) -> Path:
    """Write a float32-feature copy of `source` (a uint8 policy bundle) to `out`."""
    from splitedge.bundle import write_manifest

    manifest = json.loads((source / "manifest.json").read_text())
    policy = manifest["policy"]
    enc = policy["encoder"]
    enc_ir = ir.EncoderIR.from_json((source / enc["ir"]).read_text())
    weights = ir.load_weights(source / enc["weights"])
    float_ir = replace(enc_ir, output_dtype="float32")
    out.mkdir(parents=True)
    (out / "encoder_ir.json").write_text(float_ir.to_json())
    shutil.copy(source / enc["weights"], out / "encoder_weights.npz")
    shutil.copy(source / policy["full"]["onnx"], out / "full.onnx")
    float_encoder_onnx(enc_ir, weights, out / "encoder.onnx")
    float_head_onnx(source / policy["head"]["onnx"], out / "head.onnx")
    enc.update(
        ir="encoder_ir.json",
        weights="encoder_weights.npz",
        onnx="encoder.onnx",
        digest=ir.digest(float_ir, weights),
        # the scale a float32 bundle records is informative (es2's final storage step)
        output={**enc["output"], "dtype": "float32"},
    )
    policy.update(head={"onnx": "head.onnx"}, full={"onnx": "full.onnx"})
    manifest.pop("files", None)
    manifest.pop("format", None)
    write_manifest(
        out, {**manifest, "name": f"{manifest['name']}-float", "version": manifest["version"]}
    )
    return out
