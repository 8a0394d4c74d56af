"""The numpy reference interpreter (edge.encoder.reference) and calibration against torch."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F  # noqa: N812

from edge.encoder import reference as ref
from edge.encoder.calibrate import calibrate, from_ir, to_extra
from models.encoders import FakeQuantAffine, MiniConv, build_ir
from splitedge.ir import EncoderIR, Layer

CHANNELS = (1, 2, 3, 5, 6, 7, 9)  # mostly not multiples of 4: the GL packing must pad


def random_case(
    rng: np.random.Generator, stages: int = 1
) -> tuple[EncoderIR, dict[str, np.ndarray]]:
    """A random valid IR over the IR's whole range and weights: conv kernel 1..8, stride 1..4,
    padding 0..3; optional ReLU; optional max/avg pool, kernel 1..8, its own stride 1..8
    (often = kernel, torch's default) and padding 0..kernel // 2; mostly odd channel counts."""
    while True:
        c = int(rng.choice(CHANNELS))
        h, w = int(rng.integers(12, 29)), int(rng.integers(12, 29))
        layers, weights = [], {}
        for n in range(stages):
            k, s, p = int(rng.integers(1, 9)), int(rng.integers(1, 5)), int(rng.integers(0, 4))
            out = int(rng.choice(CHANNELS))
            layers.append(Layer("conv", f"c{n}", c, out, k, s, p))
            std = 1.0 / np.sqrt(c * k * k)  # keeps activations O(1) however wide the conv
            weights[f"c{n}.weight"] = rng.normal(0, std, (out, c, k, k)).astype(np.float32)
            weights[f"c{n}.bias"] = rng.normal(0, 0.2, out).astype(np.float32)
            c = out
            if rng.random() < 0.7:
                layers.append(Layer("relu"))
            if rng.random() < 0.6:
                pk = int(rng.integers(1, 9))
                ps = pk if rng.random() < 0.4 else int(rng.integers(1, 9))
                pp = int(rng.integers(0, pk // 2 + 1))
                layers.append(Layer(str(rng.choice(["maxpool", "avgpool"])), "", 0, 0, pk, ps, pp))
        layers.append(Layer("flatten"))
        ir = EncoderIR(
            layers[0].in_channels, h, w, tuple(layers), output_scale=float(rng.uniform(0.005, 0.05))
        )
        try:
            ir.shapes()
        except ValueError:  # shrank below 1x1: draw again
            continue
        return ir, weights


# Fixed encoders beside the random ones: SB3's NatureCNN on an Atari-style stack, and
# channels that are not multiples of 4 (3 -> 6 -> 5) through strided, padded pools.
NATURE_CNN = [  # SB3's NatureCNN conv stack (its Linear runs on the server, in the head)
    {"op": "conv", "out_channels": 32, "kernel": 8, "stride": 4},
    {"op": "relu"},
    {"op": "conv", "out_channels": 64, "kernel": 4, "stride": 2},
    {"op": "relu"},
    {"op": "conv", "out_channels": 64, "kernel": 3, "stride": 1},
    {"op": "relu"},
    {"op": "flatten"},
]
ODD_CHANNELS = [
    {"op": "conv", "out_channels": 6, "kernel": 5, "stride": 2, "padding": 2},
    {"op": "relu"},
    {"op": "maxpool", "kernel": 3, "stride": 2, "padding": 1},
    {"op": "conv", "out_channels": 5, "kernel": 3, "padding": 1},
    {"op": "relu"},
    {"op": "avgpool", "kernel": 2, "stride": 1, "padding": 1},
    {"op": "flatten"},
]
FIXED_CASES = {"naturecnn": (NATURE_CNN, (4, 84, 84)), "odd-channels": (ODD_CHANNELS, (3, 29, 31))}


def fixed_case(name: str, seed: int = 0) -> tuple[EncoderIR, dict[str, np.ndarray]]:
    """One of FIXED_CASES with random weights scaled by fan-in (activations stay O(1))."""
    arch, shape = FIXED_CASES[name]
    ir = build_ir(arch, *shape)
    rng = np.random.default_rng(seed)
    weights = {}
    for layer in ir.layers:
        if layer.op == "conv":
            k, c = layer.kernel, layer.in_channels
            shape4 = (layer.out_channels, c, k, k)
            weights[f"{layer.name}.weight"] = rng.normal(0, 1 / np.sqrt(c * k * k), shape4).astype(
                np.float32
            )
            weights[f"{layer.name}.bias"] = rng.normal(0, 0.1, layer.out_channels).astype(
                np.float32
            )
    return ir, weights


def torch_features(
    ir: EncoderIR, weights: dict[str, np.ndarray], obs: np.ndarray, act_quant=None
) -> np.ndarray:
    """The torch module built from the IR (what training runs): float features (B, F)."""
    model = MiniConv.from_weights(ir, weights, act_quant)
    with torch.no_grad():
        x = torch.from_numpy(obs).to(torch.float32) * ir.input_scale
        return model.net(x).flatten(1).numpy()


def torch_stage(
    layer: Layer, relu: bool, x: np.ndarray, weights: dict[str, np.ndarray]
) -> np.ndarray:
    """One conv/pool stage with torch.nn.functional, float32."""
    t = torch.from_numpy(np.asarray(x, np.float32))
    if layer.op == "conv":
        w, b = (torch.from_numpy(weights[f"{layer.name}.{k}"]) for k in ("weight", "bias"))
        t = F.conv2d(t, w, b, layer.stride, layer.padding)
    elif layer.op == "maxpool":
        t = F.max_pool2d(t, layer.kernel, layer.stride, layer.padding)
    else:
        t = F.avg_pool2d(t, layer.kernel, layer.stride, layer.padding, count_include_pad=True)
    return (F.relu(t) if relu else t).numpy()


def frames(rng: np.random.Generator, ir: EncoderIR, n: int) -> np.ndarray:
    return rng.integers(0, 256, (n, ir.channels, ir.height, ir.width), dtype=np.uint8)


def test_reference_matches_torch_on_60_random_configs() -> None:
    rng = np.random.default_rng(0)
    for i in range(60):
        ir, w = random_case(rng, stages=1 + i % 2)
        obs = frames(rng, ir, 2)
        want = torch_features(ir, w, obs)
        got = ref.forward(ir, w, obs)
        assert got.shape == want.shape
        assert np.abs(got - want).max() <= 1e-4, f"config {i}: {ir.to_json()}"


@pytest.mark.parametrize("name", sorted(FIXED_CASES))
def test_reference_matches_torch_on_fixed_encoders(name: str) -> None:
    ir, w = fixed_case(name)
    obs = frames(np.random.default_rng(5), ir, 2)
    want = torch_features(ir, w, obs)
    assert np.abs(ref.forward(ir, w, obs) - want).max() <= 1e-4


class _EncoderOnnx(torch.nn.Module):
    """What encoder.onnx computes before quantisation: SB3's /255, MiniConv's net, flatten."""

    def __init__(self, model: MiniConv):
        super().__init__()
        self.net, self.scale = model.net, model.ir.input_scale

    def forward(self, obs: torch.Tensor) -> torch.Tensor:
        return self.net(obs.to(torch.float32) * self.scale).flatten(1)  # (B, F)


@pytest.mark.parametrize("name", [*sorted(FIXED_CASES), "random"])
def test_widened_miniconv_exports_to_onnx_and_onnxruntime_matches_torch(name, tmp_path) -> None:
    """The ops of a widened MiniConv (big strided kernels, padded strided pools, odd channels)
    through torch.onnx.export as models.export runs it (TorchScript exporter, OPSET)."""
    import onnxruntime as ort

    from models.export import OPSET

    if name == "random":
        rng = np.random.default_rng(6)
        ir, w = random_case(rng, stages=2)
        while not any(x.op.endswith("pool") and x.padding for x in ir.layers):
            ir, w = random_case(rng, stages=2)
    else:
        ir, w = fixed_case(name)
    graph = _EncoderOnnx(MiniConv.from_weights(ir, w)).eval()
    obs = frames(np.random.default_rng(7), ir, 3)
    path = tmp_path / "encoder.onnx"
    with warnings.catch_warnings():  # the TorchScript exporter's deprecation notices
        warnings.simplefilter("ignore")
        torch.onnx.export(
            graph,
            (torch.from_numpy(obs[:1]),),
            str(path),
            input_names=["obs"],
            output_names=["features"],
            dynamic_axes={"obs": {0: "batch"}, "features": {0: "batch"}},
            opset_version=OPSET,
            dynamo=False,
        )
    got = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(
        None, {"obs": obs}
    )
    want = torch_features(ir, w, obs)
    assert got[0].shape == want.shape == (3, ir.feature_count)
    assert np.abs(got[0] - want).max() <= 1e-4


def test_encode_quantises_like_encoder_onnx() -> None:
    """q = round(clamp(x, 0, max) / scale), as models.export's EncoderGraph (FakeQuantU8.to_uint8)."""
    rng = np.random.default_rng(1)
    ir, w = random_case(rng)
    obs = frames(rng, ir, 4)
    model = MiniConv.from_weights(ir, w)
    with torch.no_grad():
        want = model.quant.to_uint8(torch.from_numpy(ref.forward(ir, w, obs))).numpy()
    np.testing.assert_array_equal(ref.quantise_output(ir, ref.forward(ir, w, obs)), want)


def test_quantised_reference_matches_torch_quantisation_aware_module() -> None:
    rng = np.random.default_rng(2)
    for _ in range(10):
        ir, w = random_case(rng, stages=3)
        obs = frames(rng, ir, 3)
        aq = calibrate(ir, w, frames(rng, ir, 8))
        got = ref.forward(ir, w, obs, aq)
        want = torch_features(ir, w, obs, aq)
        step = ir.output_scale  # the features are compared on the output grid
        q_got, q_want = np.round(got / step), np.round(want / step)
        assert np.mean(q_got == q_want) >= 0.98  # float32 vs float64 may flip a rounding tie


def test_calibrated_scales_span_each_stage_range() -> None:
    rng = np.random.default_rng(3)
    ir, w = random_case(rng, stages=3)
    obs = frames(rng, ir, 16)
    aq = calibrate(ir, w, obs)
    x = obs.astype(np.float32) * ir.input_scale
    stages = ref.stages(ir)
    assert [q.layer for q in aq] == [s.index for s in stages[:-1]]
    for stage, q in zip(stages[:-1], aq, strict=False):
        x = torch_stage(stage.layer, stage.relu, x, w)
        lo, hi = min(float(x.min()), 0.0), max(float(x.max()), 0.0)
        assert q.scale == pytest.approx((hi - lo) / 255.0, rel=1e-5)
        assert (0 - q.zero_point) * q.scale == pytest.approx(lo, abs=q.scale)
        if stage.relu:
            assert q.zero_point == 0


def test_scales_round_trip_through_the_ir() -> None:
    rng = np.random.default_rng(4)
    ir, w = random_case(rng, stages=2)
    aq = calibrate(ir, w, frames(rng, ir, 4))
    doc = EncoderIR.from_json(ir.to_json())
    assert from_ir(doc) is None
    with_scales = EncoderIR(
        ir.channels, ir.height, ir.width, ir.layers, extra={"activation_quant": to_extra(aq)}
    )
    assert from_ir(EncoderIR.from_json(with_scales.to_json())) == aq


def test_stages_fuse_relu_and_refuse_what_cannot_run() -> None:
    ir = EncoderIR(
        3,
        8,
        8,
        (
            Layer("relu"),
            Layer("conv", "a", 3, 4, 3),
            Layer("relu"),
            Layer("relu"),
            Layer("maxpool", kernel=2),
            Layer("flatten"),
        ),
    )
    st = ref.stages(ir)
    assert [(s.index, s.layer.op, s.relu) for s in st] == [(1, "conv", True), (4, "maxpool", False)]
    with pytest.raises(ValueError, match="flatten must be the last layer"):
        ref.stages(EncoderIR(3, 8, 8, (Layer("flatten"), Layer("conv", "a", 3, 4, 3))))
    with pytest.raises(ValueError, match="no conv or pool"):
        ref.stages(EncoderIR(3, 8, 8, (Layer("relu"), Layer("flatten"))))


def test_fake_quant_affine_is_straight_through_inside_its_range() -> None:
    fq = FakeQuantAffine(scale=0.1, zero_point=10).train()
    x = torch.tensor([-2.0, -0.04, 0.26, 30.0], requires_grad=True)  # range is [-1.0, 24.5]
    y = fq(x)
    y.sum().backward()
    np.testing.assert_allclose(y.detach().numpy(), [-1.0, 0.0, 0.3, 24.5], atol=1e-6)
    np.testing.assert_array_equal(x.grad.numpy(), [0.0, 1.0, 1.0, 0.0])
