"""Pass planning (edge.encoder.plan) and device profiles (deploy.devices): packing, splitting, refusals."""

from __future__ import annotations

import sys

import numpy as np
import pytest

from deploy.devices import load_profile, profiles
from edge.encoder.calibrate import calibrate
from edge.encoder.plan import Limits, PlanError, build_plan
from splitedge.errors import SplitedgeError
from splitedge.ir import EncoderIR, Layer
from tests.conftest import ROOT

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib


def conv_ir(
    cin: int, cout: int, k: int, h: int = 12, w: int = 12, tail: tuple[Layer, ...] = ()
) -> EncoderIR:
    return EncoderIR(
        cin, h, w, (Layer("conv", "wide", cin, cout, k), Layer("relu"), *tail, Layer("flatten"))
    )


def zeros(ir: EncoderIR) -> dict[str, np.ndarray]:
    out = {}
    for layer in ir.layers:
        if layer.op == "conv":
            out[f"{layer.name}.weight"] = np.zeros(
                (layer.out_channels, layer.in_channels, layer.kernel, layer.kernel), np.float32
            )
            out[f"{layer.name}.bias"] = np.zeros(layer.out_channels, np.float32)
    return out


def test_one_pass_per_group_of_four_output_channels() -> None:
    ir = conv_ir(5, 7, 3, tail=(Layer("maxpool", kernel=2),))
    plan = build_plan(ir, zeros(ir), Limits())
    convs = [p for p in plan.passes if p.op == "conv"]
    pools = [p for p in plan.passes if p.op == "maxpool"]
    assert [p.group for p in convs] == [0, 1] and [p.group for p in pools] == [
        0,
        1,
    ]  # ceil(7 / 4) = 2
    assert all(len(p.taps) == 2 * 3 * 3 for p in convs)  # ceil(5 / 4) = 2 input groups x 3x3
    assert all(len(p.taps) == 4 and p.samples == 4 for p in pools)
    assert plan.buffers[0].storage == "frame" and plan.buffers[plan.output].channels == 7


def test_float_targets_split_a_conv_that_exceeds_the_sample_budget() -> None:
    ir = conv_ir(9, 4, 5)  # 3 input groups x 25 taps = 75 samples
    plan = build_plan(ir, zeros(ir), load_profile("pi-4b").limits())
    convs = [p for p in plan.passes if p.op == "conv"]
    assert sum(len(p.taps) for p in convs) == 75
    assert len(convs) == 2 and all(p.samples <= 64 for p in convs)
    assert convs[0].partial is None and convs[1].partial is not None  # the running sum is carried
    assert [p.finish for p in convs] == [False, True]
    assert plan.buffers[convs[0].dst].storage == "float"


@pytest.mark.parametrize(
    ("profile", "ir", "words"),
    [
        # es2 cannot carry partial sums in 8 bits: 75 samples > 64 is refused, not split
        ("pi-zero-2w", conv_ir(9, 4, 5), ("wide", "75", "64", "pi-zero-2w")),
        # 64 channels side by side at width 300: a 4800-texel atlas on a 4096 GPU
        (
            "pi-4b",
            conv_ir(3, 64, 1, h=8, w=300),
            ("wide", "4800", "max_texture_size=4096", "pi-4b"),
        ),
        (
            "jetson-nano",
            conv_ir(3, 64, 1, h=8, w=1100),
            ("wide", "17600", "max_texture_size=16384", "jetson-nano"),
        ),
    ],
)
def test_each_profile_refuses_a_model_beyond_its_limits(
    profile: str, ir: EncoderIR, words: tuple[str, ...]
) -> None:
    prof = load_profile(profile)
    weights = zeros(ir)
    scales = calibrate(ir, weights, np.zeros((1, ir.channels, ir.height, ir.width), np.uint8))
    with pytest.raises(PlanError) as err:
        build_plan(ir, weights, prof.limits(), scales, target=prof.gl_target)
    message = str(err.value)
    assert "\n" not in message and isinstance(err.value, SplitedgeError)
    for word in words:
        assert word in message


def test_profiles_fit_the_shipped_encoder() -> None:
    from splitedge.ir import load_weights

    bundle = ROOT / "models" / "zoo" / "cartpole-ppo"
    ir = EncoderIR.from_json((bundle / "encoder_ir.json").read_text())
    weights = load_weights(bundle / "encoder_weights.npz")
    scales = calibrate(ir, weights, np.zeros((1, 3, 48, 48), np.uint8))
    for name in profiles():
        prof = load_profile(name)
        plan = build_plan(ir, weights, prof.limits(), scales, target=prof.gl_target)
        assert all(p.samples <= (prof.max_samples_per_pass or 10**9) for p in plan.passes)


def test_nature_cnn_plans_per_profile() -> None:
    """NatureCNN (4, 84, 84): conv2 has 8 input groups x 4x4 = 128 taps, conv3 16 x 3x3 = 144."""
    from models.encoders import build_ir
    from tests.test_encoder_reference import NATURE_CNN

    ir = build_ir(NATURE_CNN, 4, 84, 84)
    weights = zeros(ir)
    scales = calibrate(ir, weights, np.zeros((1, 4, 84, 84), np.uint8))
    taps = {"conv0": 64, "conv1": 128, "conv2": 144}
    plan = build_plan(ir, weights, Limits(), scales, target="es2")  # no profile: one pass per group
    assert len(plan.passes) == 8 + 16 + 16
    assert {p.label: len(p.taps) for p in plan.passes} == taps
    pi4 = build_plan(ir, weights, load_profile("pi-4b").limits(), target="es31")
    for label, total in taps.items():  # each group's taps split into chunks of <= 64 samples
        chunks = [p for p in pi4.passes if p.label == label and p.group == 0]
        assert sum(len(p.taps) for p in chunks) == total
        assert all(p.samples <= 64 for p in chunks)
    with pytest.raises(PlanError, match="layer conv1 needs 128 texture samples in one pass"):
        build_plan(ir, weights, load_profile("pi-zero-2w").limits(), scales, target="es2")


def test_pool_passes_carry_stride_and_padding() -> None:
    ir = conv_ir(3, 6, 3, h=20, w=20, tail=(Layer("avgpool", kernel=5, stride=3, padding=2),))
    plan = build_plan(ir, zeros(ir), Limits())
    pools = [p for p in plan.passes if p.op == "avgpool"]
    assert [(p.group, p.kernel, p.stride, p.padding, p.samples) for p in pools] == [
        (0, 5, 3, 2, 25),
        (1, 5, 3, 2, 25),
    ]
    assert plan.buffers[plan.output].height == (18 + 4 - 5) // 3 + 1  # torch's floor rule


def test_8bit_storage_needs_scales() -> None:
    ir = conv_ir(3, 4, 3, tail=(Layer("maxpool", kernel=2),))
    with pytest.raises(PlanError, match="no 8-bit activation scale"):
        build_plan(ir, zeros(ir), Limits(float_storage=False))


def test_max_batch_follows_the_texture_size_limit() -> None:
    ir = conv_ir(3, 4, 3, h=20, w=20)
    assert build_plan(ir, zeros(ir), Limits(max_texture_size=64)).max_batch() == 3  # 64 // 20 rows


def test_limits_merge_keeps_the_stricter_value() -> None:
    ctx = Limits(
        max_texture_units=32, max_uniform_vectors=1024, max_texture_size=16384, float_storage=True
    )
    merged = ctx.merge(load_profile("pi-4b").limits())
    assert (
        merged.max_texture_units,
        merged.max_samples_per_pass,
        merged.max_uniform_vectors,
        merged.max_texture_size,
    ) == (8, 64, 1024, 4096)
    assert merged.source == "device profile pi-4b"
    assert not ctx.merge(Limits(float_storage=False)).float_storage


def test_profiles_load_and_agree_with_flash_preflight() -> None:
    assert profiles() == ["jetson-nano", "pi-4b", "pi-zero-2w"]
    targets = {name: load_profile(name).gl_target for name in profiles()}
    assert targets == {"jetson-nano": "gl33", "pi-4b": "es31", "pi-zero-2w": "es2"}
    assert load_profile("pi-zero-2w").float_render_targets is False
    requirements = tomllib.loads((ROOT / "deploy" / "flash" / "requirements.toml").read_text())
    for name in profiles():
        assert load_profile(name).ram_mb == requirements[name]["ram_mb"]
    with pytest.raises(SplitedgeError, match="unknown device profile 'pi-5'.*pi-4b"):
        load_profile("pi-5")
