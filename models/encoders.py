"""The device encoder as a torch module, built from and exported to the layer IR.

One module serves SB3 training (as a features extractor), the ONNX exporter and
the IR/weights exporter, so there is no second copy of the architecture.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import gymnasium as gym
import numpy as np
import torch
from stable_baselines3.common.torch_layers import BaseFeaturesExtractor
from torch import nn

from splitedge.ir import EncoderIR, Layer

# Named architectures for (C, 48, 48)-ish inputs; each conv has out_channels % 4 == 0.
ARCHS: dict[str, list[dict[str, Any]]] = {
    "miniconv": [
        {"op": "conv", "out_channels": 8, "kernel": 5, "stride": 2},
        {"op": "relu"},
        {"op": "conv", "out_channels": 8, "kernel": 3},
        {"op": "relu"},
        {"op": "maxpool", "kernel": 2},
        {"op": "conv", "out_channels": 4, "kernel": 3},
        {"op": "relu"},
        {"op": "maxpool", "kernel": 2},
        {"op": "flatten"},
    ],
}
# Camera-resolution frames (224x224): the device first averages 4x4 blocks (one shader pass,
# no weights), then runs MiniConv on the 56x56 result; only the features leave the device.
ARCHS["miniconv-camera"] = [{"op": "avgpool", "kernel": 4}, *ARCHS["miniconv"]]
# Features leave the device as uint8: q = round(clamp(x, 0, FEATURE_MAX) / scale).
FEATURE_MAX = 8.0


class FakeQuantU8(nn.Module):
    """Round to the uint8 grid on the forward pass, identity gradient inside the range."""

    def __init__(self, max_value: float):
        super().__init__()
        self.scale = max_value / 255.0
        self.max_value = max_value

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.clamp(x, 0.0, self.max_value)
        q = torch.round(x / self.scale) * self.scale
        if not self.training:  # exact grid values, identical to what the server decodes
            return q
        return x + (q - x).detach()

    def to_uint8(self, x: torch.Tensor) -> torch.Tensor:
        return torch.round(torch.clamp(x, 0.0, self.max_value) / self.scale).to(torch.uint8)


class FakeQuantAffine(nn.Module):
    """8-bit storage of an activation between es2 passes: x -> (q - zp) * scale, q in 0..255.

    Straight-through gradient inside the representable range, as FakeQuantU8.
    """

    def __init__(self, scale: float, zero_point: int = 0):
        super().__init__()
        self.scale, self.zero_point = float(scale), int(zero_point)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        lo, hi = -self.zero_point * self.scale, (255 - self.zero_point) * self.scale
        x = torch.clamp(x, lo, hi)
        q = torch.round(x / self.scale) * self.scale
        if not self.training:
            return q
        return x + (q - x).detach()


def build_ir(arch: str | list[dict[str, Any]], channels: int, height: int, width: int) -> EncoderIR:
    """IR for a named (or explicit) architecture on an input shape, channels chained."""
    spec = ARCHS[arch] if isinstance(arch, str) else arch
    layers, c, n = [], channels, 0
    for raw in spec:
        d = dict(raw)
        if d["op"] == "conv":
            d.setdefault("name", f"conv{n}")
            d["in_channels"] = c
            c = d["out_channels"]
            n += 1
        layers.append(Layer(**d))
    return EncoderIR(
        channels,
        height,
        width,
        tuple(layers),
        output_scale=FEATURE_MAX / 255.0,
        output_zero_point=0,
    )


def _storage_points(ir: EncoderIR, act_quant: Sequence[Any] | None) -> dict[int, nn.Module]:
    """Layer index after which each stored (non-final) stage output is fake-quantised."""
    if not act_quant:
        return {}
    from edge.encoder.reference import stages  # the stage definition the GL compiler uses

    quant = {q.layer: q for q in act_quant}
    out: dict[int, nn.Module] = {}
    for stage in stages(ir)[:-1]:
        if stage.index in quant:
            end = stage.index
            while end + 1 < len(ir.layers) and ir.layers[end + 1].op == "relu":
                end += 1
            out[end] = FakeQuantAffine(quant[stage.index].scale, quant[stage.index].zero_point)
    return out


class MiniConv(nn.Module):
    """IR-described conv/ReLU/pool stack; input is float in [0, 1] (B, C, H, W)."""

    def __init__(self, ir: EncoderIR, act_quant: Sequence[Any] | None = None):
        """`act_quant`: optional es2 activation scales (edge.encoder.reference.ActQuant list):
        quantisation-aware mode, each stored stage output is fake-quantised to 8 bits."""
        super().__init__()
        self.ir = ir
        mods: list[nn.Module] = []
        storage_after = _storage_points(ir, act_quant)
        for i, layer in enumerate(ir.layers):
            if layer.op == "conv":
                mods.append(
                    nn.Conv2d(
                        layer.in_channels,
                        layer.out_channels,
                        layer.kernel,
                        layer.stride,
                        layer.padding,
                    )
                )
            elif layer.op == "relu":
                mods.append(nn.ReLU())
            elif layer.op == "maxpool":
                mods.append(nn.MaxPool2d(layer.kernel, layer.stride, layer.padding))
            elif layer.op == "avgpool":  # count_include_pad=True, as the IR defines
                mods.append(nn.AvgPool2d(layer.kernel, layer.stride, layer.padding))
            elif layer.op == "flatten":
                mods.append(nn.Flatten())
            if i in storage_after:
                mods.append(storage_after[i])
        self.net = nn.Sequential(*mods)
        self.quant = FakeQuantU8(ir.output_scale * 255.0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.quant(self.net(x).flatten(1))  # (B, F) on the uint8 grid

    @classmethod
    def from_weights(
        cls, ir: EncoderIR, weights: dict[str, np.ndarray], act_quant: Sequence[Any] | None = None
    ) -> MiniConv:
        """A MiniConv holding IR weights (<name>.weight / <name>.bias), in eval mode."""
        model = cls(ir, act_quant)
        convs = [layer for layer in ir.layers if layer.op == "conv"]
        mods = [m for m in model.net if isinstance(m, nn.Conv2d)]
        with torch.no_grad():
            for layer, mod in zip(convs, mods, strict=True):
                mod.weight.copy_(
                    torch.from_numpy(np.asarray(weights[f"{layer.name}.weight"], np.float32))
                )
                mod.bias.copy_(
                    torch.from_numpy(np.asarray(weights[f"{layer.name}.bias"], np.float32))
                )
        return model.eval()

    def weights(self) -> dict[str, np.ndarray]:
        """IR weight dict: <name>.weight / <name>.bias as float32 numpy."""
        out: dict[str, np.ndarray] = {}
        convs = [layer for layer in self.ir.layers if layer.op == "conv"]
        mods = [m for m in self.net if isinstance(m, nn.Conv2d)]
        for layer, mod in zip(convs, mods, strict=True):
            out[f"{layer.name}.weight"] = mod.weight.detach().cpu().numpy().astype(np.float32)
            out[f"{layer.name}.bias"] = mod.bias.detach().cpu().numpy().astype(np.float32)
        return out


class MiniConvExtractor(BaseFeaturesExtractor):
    """SB3 features extractor around MiniConv; works out its feature size from the IR.

    :param observation_space: uint8 (C, H, W) image space
    :param arch: name in ARCHS (or an explicit layer list)
    :param act_quant: es2 activation scales for quantisation-aware training (default: none)
    """

    def __init__(
        self,
        observation_space: gym.spaces.Box,
        arch: str = "miniconv",
        act_quant: Sequence[Any] | None = None,
    ):
        c, h, w = observation_space.shape
        ir = build_ir(arch, c, h, w)
        super().__init__(observation_space, features_dim=ir.feature_count)
        self.encoder = MiniConv(ir, act_quant)

    def forward(self, observations: torch.Tensor) -> torch.Tensor:
        return self.encoder(observations)
