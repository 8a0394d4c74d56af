"""Encoder IR: JSON round trip, shape inference against torch, clear errors for bad layers."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from models.encoders import ARCHS, MiniConv, build_ir
from splitedge import ir
from tests.conftest import ROOT
from tests.test_encoder_reference import NATURE_CNN


@pytest.mark.parametrize("shape", [(3, 48, 48), (2, 40, 40), (4, 33, 29)])
def test_shapes_match_torch(shape: tuple[int, int, int]) -> None:
    enc_ir = build_ir("miniconv", *shape)
    model = MiniConv(enc_ir).eval()
    out = model.net(torch.zeros(1, *shape))
    assert out.shape[1] == enc_ir.feature_count


def test_json_round_trip_and_digest() -> None:
    enc_ir = build_ir("miniconv", 3, 48, 48)
    again = ir.EncoderIR.from_json(enc_ir.to_json())
    assert again == enc_ir
    w = MiniConv(enc_ir).weights()
    ir.check_weights(enc_ir, w)
    d = ir.digest(enc_ir, w)
    w2 = {k: v.copy() for k, v in w.items()}
    w2["conv0.bias"][0] += 1e-3
    assert ir.digest(enc_ir, w2) != d
    assert ir.digest(again, w) == d


def test_weights_npz_round_trip_without_pickle(tmp_path) -> None:
    w = {"c.weight": np.arange(6, dtype=np.float32).reshape(1, 1, 2, 3)}
    p = tmp_path / "w.npz"
    p.write_bytes(ir.save_weights(w))
    assert np.array_equal(ir.load_weights(p)["c.weight"], w["c.weight"])


@pytest.mark.parametrize(
    "bad, match",
    [
        (
            {"op": "conv", "name": "c", "in_channels": 3, "out_channels": 4, "kernel": 9},
            "kernel 9 outside 1..8",
        ),
        (
            {"op": "conv", "name": "c", "in_channels": 3, "out_channels": 4, "stride": 5},
            "stride 5 outside 1..4",
        ),
        (
            {"op": "conv", "name": "c", "in_channels": 3, "out_channels": 4, "stride": 0},
            "stride 0 outside 1..4",
        ),
        (
            {"op": "conv", "name": "c", "in_channels": 3, "out_channels": 4, "padding": 4},
            "padding 4 outside 0..3",
        ),
        (
            {"op": "conv", "name": "c", "in_channels": 3, "out_channels": 0},
            "out_channels 0 outside >= 1",
        ),
        (
            {"op": "conv", "name": "c", "in_channels": 3, "out_channels": 4, "kernel": 2.0},
            "kernel 2.0 is not an integer \\(1..8\\)",
        ),
        ({"op": "maxpool", "kernel": 9}, "maxpool: kernel 9 outside 1..8"),
        ({"op": "avgpool", "kernel": 2, "stride": 9}, "avgpool: stride 9 outside 1..8"),
        ({"op": "avgpool", "kernel": 2, "stride": 0}, "avgpool: stride 0 outside 1..8"),
        ({"op": "maxpool", "kernel": 3, "padding": 2}, "maxpool: padding 2 outside 0..1"),
        ({"op": "avgpool", "kernel": 1, "padding": 1}, "avgpool: padding 1 outside 0..0"),
        ({"op": "gelu"}, "unknown IR op 'gelu'"),
        ({"op": "conv", "in_channels": 3, "out_channels": 4}, "needs a name"),
        (
            {"op": "maxpool", "kernel": 2, "dilation": 2},
            "maxpool: unknown attribute 'dilation' = 2",
        ),
    ],
)
def test_bad_layers_are_refused(bad: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match) as err:
        ir.Layer.from_dict(bad)
    assert "\n" not in str(err.value)


def test_pool_stride_defaults_to_kernel_and_old_json_keeps_its_text() -> None:
    """Bundles from before strided pools have no pool stride: it means stride = kernel."""
    assert ir.Layer("maxpool", kernel=3) == ir.Layer("maxpool", kernel=3, stride=3)
    assert ir.Layer("conv", "c", 3, 4, 3).stride == 1
    old = (ROOT / "models" / "zoo" / "cartpole-ppo" / "encoder_ir.json").read_text()
    loaded = ir.EncoderIR.from_json(old)
    assert [(x.kernel, x.stride, x.padding) for x in loaded.layers if x.op == "maxpool"] == [
        (2, 2, 0),
        (2, 2, 0),
    ]
    assert loaded.to_json() == old.rstrip("\n")  # same text, so the same digest as shipped


def test_pool_stride_and_padding_round_trip() -> None:
    layers = (
        ir.Layer("conv", "c0", 3, 6, 8, 4, 3),
        ir.Layer("maxpool", kernel=3, stride=2, padding=1),
        ir.Layer("avgpool", kernel=2, stride=1, padding=1),
        ir.Layer("maxpool", kernel=2, stride=2),
        ir.Layer("flatten"),
    )
    enc_ir = ir.EncoderIR(3, 64, 64, layers)
    text = enc_ir.to_json()
    assert ir.EncoderIR.from_json(text) == enc_ir
    pools = [d for d in json.loads(text)["layers"] if d["op"].endswith("pool")]
    assert pools == [
        {"op": "maxpool", "kernel": 3, "stride": 2, "padding": 1},
        {"op": "avgpool", "kernel": 2, "stride": 1, "padding": 1},
        {"op": "maxpool", "kernel": 2},  # stride = kernel is the default, so not written
    ]


@pytest.mark.parametrize(
    ("arch", "shape"),
    [
        (NATURE_CNN, (4, 84, 84)),
        (NATURE_CNN, (3, 64, 64)),
        (
            [
                {"op": "conv", "out_channels": 6, "kernel": 7, "stride": 3, "padding": 3},
                {"op": "maxpool", "kernel": 3, "stride": 2, "padding": 1},
                {"op": "conv", "out_channels": 5, "kernel": 1},
                {"op": "avgpool", "kernel": 4, "stride": 1, "padding": 2},
                {"op": "maxpool", "kernel": 5, "stride": 7, "padding": 2},
                {"op": "flatten"},
            ],
            (3, 61, 57),
        ),
    ],
)
def test_widened_shapes_match_torch(arch: list, shape: tuple[int, int, int]) -> None:
    enc_ir = build_ir(arch, *shape)
    model = MiniConv(enc_ir).eval()
    x = torch.zeros(1, *shape)
    for module, layer, chw in zip(model.net, enc_ir.layers, enc_ir.shapes(), strict=True):
        x = module(x)
        if layer.op != "flatten":
            assert tuple(x.shape[1:]) == chw, layer
    assert x.shape[1] == enc_ir.feature_count


def test_chain_errors_name_the_layer() -> None:
    layers = (ir.Layer("conv", "c0", 3, 4, 5), ir.Layer("conv", "c1", 8, 4, 3))
    with pytest.raises(ValueError, match="layer 1 \\(c1\\): in_channels 8 but input has 4"):
        ir.EncoderIR(3, 16, 16, layers).shapes()


def test_every_arch_has_multiple_of_4_channels() -> None:
    for spec in ARCHS.values():
        assert all(layer["out_channels"] % 4 == 0 for layer in spec if layer["op"] == "conv")
