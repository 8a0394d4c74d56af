"""GL encoders (gl33, es31, es2) on Mesa llvmpipe through EGL, against torch.

Float targets: max abs error <= 1e-4 on random configurations. es2 stores every stage in
8 bits: each stage is compared with torch run on es2's own input to that stage, and must
land within one quantisation step of that stage's grid.
SPLITEDGE_REQUIRE_GL=1 (set by .ci/run) turns a missing GL context into a failure.
"""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest

from deploy.devices import load_profile
from edge.encoder import choose_auto
from edge.encoder import reference as ref
from edge.encoder.calibrate import calibrate
from edge.encoder.egl import GLUnavailable, context
from edge.encoder.gl import GLEncoder
from edge.encoder.plan import Limits
from splitedge.errors import SplitedgeError
from splitedge.ir import EncoderIR, Layer
from tests.conftest import ROOT
from tests.test_encoder_reference import (
    FIXED_CASES,
    fixed_case,
    frames,
    random_case,
    torch_features,
    torch_stage,
)

pytestmark = pytest.mark.gl
CONFIGS = 50
# llvmpipe spends most of these tests compiling ~300 small shaders with LLVM; skipping LLVM's
# optimisation passes halves that and cannot change what the shaders compute beyond float rounding
os.environ.setdefault("GALLIVM_PERF", "nopt")


def need_gl(target: str) -> None:
    """Skip without a GL context of this kind, unless CI says GL must be there."""
    try:
        context(target)
    except GLUnavailable as e:
        if os.environ.get("SPLITEDGE_REQUIRE_GL") == "1":
            pytest.fail(f"SPLITEDGE_REQUIRE_GL=1 but {e}")
        pytest.skip(str(e))


@pytest.mark.parametrize("target", ["gl33", "es31"])
def test_float_targets_match_torch_on_random_configs(target: str) -> None:
    need_gl(target)
    rng = np.random.default_rng(10)
    for i in range(CONFIGS):
        ir, w = random_case(rng)
        obs = frames(rng, ir, 2)
        enc = GLEncoder(ir, w, target)
        try:
            err = np.abs(enc.features(obs) - torch_features(ir, w, obs)).max()
        finally:
            enc.close()
        assert err <= 1e-4, f"{target} config {i}: max abs error {err:.2e}\n{ir.to_json()}"


def es2_stage_steps(ir: EncoderIR, w: dict[str, np.ndarray], obs: np.ndarray) -> list[float]:
    """Per stage, es2's largest distance (in steps of that stage's 8-bit grid) from torch run
    on es2's own input to the stage and put on the same grid."""
    enc = GLEncoder(ir, w, "es2", act_quant=calibrate(ir, w, obs))
    try:
        outs = enc.stage_outputs(obs)
    finally:
        enc.close()
    x = obs.astype(np.float32) * ir.input_scale
    steps = []
    for stage, got, index in zip(ref.stages(ir), outs, enc.plan.stage_buffers, strict=True):
        buf = enc.plan.buffers[index]
        want = torch_stage(stage.layer, stage.relu, x, w)  # torch on es2's own input
        q = np.clip(np.round(want / buf.scale) + buf.zero_point, 0, 255)  # on the same grid
        steps.append(float(np.abs(got - (q - buf.zero_point) * buf.scale).max() / buf.scale))
        x = got
    return steps


def test_es2_is_within_one_step_of_torch_at_every_stage() -> None:
    need_gl("es2")
    rng = np.random.default_rng(11)
    for i in range(CONFIGS):
        ir, w = random_case(rng)
        steps = es2_stage_steps(ir, w, frames(rng, ir, 2))
        assert max(steps) <= 1.0001, f"config {i}: {steps} steps\n{ir.to_json()}"


@pytest.mark.parametrize("target", ["gl33", "es31", "es2"])
@pytest.mark.parametrize("case", sorted(FIXED_CASES))
def test_fixed_encoders_match_torch_on_every_target(case: str, target: str) -> None:
    """SB3's NatureCNN on (4, 84, 84) (conv3: 16 input groups x 3x3 = 144 taps in one pass with
    no device profile) and 3 -> 6 -> 5 channels through strided, padded pools."""
    need_gl(target)
    ir, w = fixed_case(case)
    obs = frames(np.random.default_rng(20), ir, 2)
    if target == "es2":
        steps = es2_stage_steps(ir, w, obs)
        assert max(steps) <= 1.0001, f"{case}: {steps} steps"
        return
    enc = GLEncoder(ir, w, target)
    try:
        err = np.abs(enc.features(obs) - torch_features(ir, w, obs)).max()
    finally:
        enc.close()
    assert err <= 1e-4, f"{target} {case}: max abs error {err:.2e}"


def test_es2_end_to_end_matches_the_quantisation_aware_torch_module() -> None:
    need_gl("es2")
    rng = np.random.default_rng(12)
    ir, w = random_case(rng, stages=3)
    obs = frames(rng, ir, 4)
    aq = calibrate(ir, w, frames(rng, ir, 8))
    enc = GLEncoder(ir, w, "es2", act_quant=aq)
    got = enc.encode(obs)
    enc.close()
    want = ref.quantise_output(ir, torch_features(ir, w, obs, aq))
    assert np.mean(got == want) >= 0.98


@pytest.mark.parametrize("target", ["gl33", "es31"])
def test_passes_split_to_fit_the_pi4_budget_still_match_torch(target: str) -> None:
    need_gl(target)
    rng = np.random.default_rng(13)
    ir = EncoderIR(
        9, 14, 15, (Layer("conv", "big", 9, 6, 5, 1, 2), Layer("relu"), Layer("flatten"))
    )
    w = {
        "big.weight": rng.normal(0, 0.3, (6, 9, 5, 5)).astype(np.float32),
        "big.bias": rng.normal(0, 0.1, 6).astype(np.float32),
    }
    enc = GLEncoder(ir, w, target, limits=load_profile("pi-4b").limits())
    assert (
        len(enc.plan.passes) == 4 and max(p.samples for p in enc.plan.passes) <= 64
    )  # 2 groups x 2 chunks
    obs = frames(rng, ir, 2)
    err = np.abs(enc.features(obs) - torch_features(ir, w, obs)).max()
    enc.close()
    assert err <= 1e-4


@pytest.mark.parametrize("target", ["gl33", "es2"])
def test_batches_grow_and_split_without_changing_results(target: str) -> None:
    need_gl(target)
    rng = np.random.default_rng(14)
    ir, w = random_case(rng, stages=2)
    obs = frames(rng, ir, 9)
    small = GLEncoder(ir, w, target, act_quant=calibrate(ir, w, obs))
    one_by_one = np.concatenate([small.encode(obs[i : i + 1]) for i in range(9)])
    np.testing.assert_array_equal(small.encode(obs), one_by_one)  # textures grew from 1 to 9 items
    small.close()
    # a texture-size limit of 2 items per atlas makes the runtime split 9 frames into 5 draws
    rows = max(b.height for b in small.plan.buffers)
    tight = GLEncoder(
        ir, w, target, act_quant=calibrate(ir, w, obs), limits=Limits(max_texture_size=2 * rows)
    )
    assert tight.plan.max_batch() == 2
    np.testing.assert_array_equal(tight.encode(obs), one_by_one)
    tight.close()


def test_es31_without_float_render_targets_uses_the_es2_scheme() -> None:
    """A Pi 4 driver without EXT_color_buffer_float: GLSL ES 3.10 shaders, 8-bit storage."""
    need_gl("es31")
    rng = np.random.default_rng(18)
    ir, w = random_case(rng, stages=2)
    obs = frames(rng, ir, 3)
    aq = calibrate(ir, w, obs)
    enc = GLEncoder(ir, w, "es31", limits=Limits(float_storage=False), act_quant=aq)
    assert {enc.plan.buffers[i].storage for i in enc.plan.stage_buffers} == {"u8"}
    got = enc.encode(obs)
    enc.close()
    want = ref.quantise_output(ir, torch_features(ir, w, obs, aq))
    assert np.mean(got == want) >= 0.98


def test_weights_are_uniforms_not_shader_text() -> None:
    need_gl("gl33")
    rng = np.random.default_rng(15)
    ir, w1 = random_case(rng)
    w2 = {k: (v + 1.2345).astype(np.float32) for k, v in w1.items()}
    texts = []
    for w in (w1, w2):
        enc = GLEncoder(ir, w, "gl33")
        texts.append([enc.renderer.fragment(p, enc.plan) for p in enc.plan.passes])
        enc.close()
    assert texts[0] == texts[1]
    assert "1.2345" not in "".join(texts[1])


def test_wrong_frames_are_a_clear_error() -> None:
    need_gl("gl33")
    rng = np.random.default_rng(16)
    ir, w = random_case(rng)
    enc = GLEncoder(ir, w, "gl33")
    with pytest.raises(SplitedgeError, match="takes uint8"):
        enc.encode(np.zeros((1, ir.channels, ir.height, ir.width), np.float32))
    enc.close()


def test_es2_runs_on_a_real_opengl_es_2_context() -> None:
    """Mesa can be told to offer only ES 2.0; the es2 backend must work there, exactly as in-process."""
    need_gl("es2")
    code = (
        "import numpy as np; from edge.encoder.gl import GLEncoder; from edge.encoder import reference as ref;"
        "from edge.encoder.calibrate import calibrate; from tests.test_encoder_reference import random_case, frames;"
        "rng = np.random.default_rng(17); ir, w = random_case(rng, stages=2); obs = frames(rng, ir, 3);"
        "aq = calibrate(ir, w, obs); enc = GLEncoder(ir, w, 'es2', act_quant=aq);"
        "print(enc.ctx.version); print(np.mean(enc.encode(obs) == ref.encode(ir, w, obs, aq)))"
    )
    env = {**os.environ, "MESA_GLES_VERSION_OVERRIDE": "2.0", "EGL_PLATFORM": "surfaceless"}
    r = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=60
    )
    assert r.returncode == 0, r.stderr
    version, agreement = r.stdout.strip().splitlines()[-2:]
    if not version.startswith("OpenGL ES 2.0"):
        pytest.skip(f"this driver ignores MESA_GLES_VERSION_OVERRIDE ({version})")
    assert float(agreement) >= 0.99


def test_auto_picks_ort_on_a_software_renderer_and_says_why() -> None:
    need_gl("gl33")
    backend, why = choose_auto()
    if context("gl33").software:
        assert backend == "ort" and "CPU rasteriser" in why
    else:
        assert backend == "gl33" and "GPU" in why


@pytest.mark.parametrize(
    ("target", "profile"), [("gl33", "jetson-nano"), ("es31", "pi-4b"), ("es2", "pi-zero-2w")]
)
def test_camera_encoder_runs_within_each_device_profile(target: str, profile: str) -> None:
    """miniconv-camera (4x4 average of a 224x224 frame, then MiniConv) on real task frames."""
    from edge.encoder.calibrate import task_frames
    from models.encoders import build_ir

    need_gl(target)
    rng = np.random.default_rng(19)
    ir = build_ir("miniconv-camera", 3, 224, 224)
    w = {}
    for layer in ir.layers:
        if layer.op == "conv":
            shape = (layer.out_channels, layer.in_channels, layer.kernel, layer.kernel)
            w[f"{layer.name}.weight"] = rng.normal(0, 0.3, shape).astype(np.float32)
            w[f"{layer.name}.bias"] = rng.normal(0, 0.1, layer.out_channels).astype(np.float32)
    obs = task_frames("cartpole-camera", 3, seed=4)
    aq = calibrate(ir, w, obs) if target == "es2" else None
    enc = GLEncoder(ir, w, target, limits=load_profile(profile).limits(), act_quant=aq)
    try:
        if target == "es2":
            got = enc.encode(obs)
            want = ref.quantise_output(ir, torch_features(ir, w, obs, aq))
            # 8-bit storage after each of 4 stages: an output may land one step away
            off = np.abs(got.astype(int) - want.astype(int))
            assert off.max() <= 1 and np.mean(off == 0) >= 0.9
        else:
            err = np.abs(enc.features(obs) - torch_features(ir, w, obs)).max()
            assert err <= 1e-4
    finally:
        enc.close()
