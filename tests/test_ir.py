"""Encoder IR: JSON round trip, shape inference against torch, clear errors for bad layers."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from models.encoders import ARCHS, MiniConv, build_ir
from splitedge import ir


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
        ({"op": "conv", "name": "c", "in_channels": 3, "out_channels": 4, "kernel": 7}, "kernel 7"),
        ({"op": "gelu"}, "unknown IR op 'gelu'"),
        ({"op": "conv", "in_channels": 3, "out_channels": 4}, "needs a name"),
    ],
)
def test_bad_layers_are_refused(bad: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        ir.Layer(**bad)


def test_chain_errors_name_the_layer() -> None:
    layers = (ir.Layer("conv", "c0", 3, 4, 5), ir.Layer("conv", "c1", 8, 4, 3))
    with pytest.raises(ValueError, match="layer 1 \\(c1\\): in_channels 8 but input has 4"):
        ir.EncoderIR(3, 16, 16, layers).shapes()


def test_every_arch_has_multiple_of_4_channels() -> None:
    for spec in ARCHS.values():
        assert all(layer["out_channels"] % 4 == 0 for layer in spec if layer["op"] == "conv")
