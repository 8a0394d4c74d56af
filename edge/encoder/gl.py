"""GL encoder runtime: compile a pass plan once, keep its textures, run frames through it.

Per call: one texture upload of the uint8 frames, one draw per pass (each draw covers the
whole batch, stacked in the atlas), one glReadPixels of the final atlas. Backends
`gl33`, `es31` and `es2` register here; see plan.py for the texture layout.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from edge.encoder import egl, register_backend
from edge.encoder.calibrate import calibrate, from_ir, policy_frames
from edge.encoder.glsl import RENDERERS
from edge.encoder.plan import Buffer, Limits, Pass, Plan, build_plan
from edge.encoder.reference import ActQuant, quantise_output
from edge.envs import bundle_env
from splitedge.errors import SplitedgeError
from splitedge.ir import EncoderIR, check_weights, load_weights

CALIBRATION_FRAMES = 256
_TRIANGLE = np.array([-1.0, -1.0, 3.0, -1.0, -1.0, 3.0], np.float32)  # covers the viewport


class GLEncoder:
    """A compiled, persistent encoder on one GL target.

    :param ir: the encoder IR
    :param weights: its weights (``<name>.weight`` / ``<name>.bias``)
    :param target: gl33, es31 or es2
    :param limits: a device profile's limits, applied on top of what the context reports
    :param act_quant: 8-bit scales per stage, needed when the target stores activations in RGBA8
    """

    def __init__(
        self,
        ir: EncoderIR,
        weights: dict[str, np.ndarray],
        target: str,
        limits: Limits | None = None,
        act_quant: Sequence[ActQuant] | None = None,
    ):
        check_weights(ir, weights)
        self.ir, self.name = ir, target
        self.ctx = egl.context(target)
        self.renderer = RENDERERS[target]()
        self.plan: Plan = build_plan(
            ir, weights, self.ctx.limits().merge(limits), act_quant, target
        )
        gl = self.gl = self.ctx.gl
        self._vao = None
        if target == "gl33":  # core profile draws need a vertex array object
            self._vao = gl.glGenVertexArrays(1)
            gl.glBindVertexArray(self._vao)
        self._vbo = gl.glGenBuffers(1)
        gl.glBindBuffer(gl.GL_ARRAY_BUFFER, self._vbo)
        gl.glBufferData(gl.GL_ARRAY_BUFFER, _TRIANGLE.nbytes, _TRIANGLE, gl.GL_STATIC_DRAW)
        self._point_attribute()  # recorded in the VAO on gl33; redone per run on ES
        self._textures = [self._texture() for _ in self.plan.buffers]
        self._programs: list[Any] = []
        self._capacity = 0
        self._reserve(1)  # storage first: framebuffers are checked for completeness
        self._fbos = [None] + [
            self._framebuffer(t, i) for i, t in enumerate(self._textures) if i > 0
        ]
        self._programs = [self._program(p) for p in self.plan.passes]
        self._set_texel_sizes()
        out = self.plan.buffers[self.plan.output]
        storage = "float32 activations" if out.storage == "float" else "8-bit activations"
        self.detail = f"{self.ctx.version} ({self.ctx.renderer}), {self.renderer.glsl}, {storage}"

    # -- setup ---------------------------------------------------------------------------
    def _point_attribute(self) -> None:
        gl = self.gl
        gl.glBindBuffer(gl.GL_ARRAY_BUFFER, self._vbo)
        gl.glEnableVertexAttribArray(0)
        gl.glVertexAttribPointer(0, 2, gl.GL_FLOAT, gl.GL_FALSE, 0, None)

    def _bind_vertices(self) -> None:
        """Our triangle on attribute 0: without a VAO (ES) that state is shared by every encoder."""
        if self._vao is not None:
            self.gl.glBindVertexArray(self._vao)
        else:
            self._point_attribute()

    def _texture(self) -> Any:
        gl = self.gl
        tex = gl.glGenTextures(1)
        gl.glBindTexture(gl.GL_TEXTURE_2D, tex)
        for param, value in (
            (gl.GL_TEXTURE_MIN_FILTER, gl.GL_NEAREST),
            (gl.GL_TEXTURE_MAG_FILTER, gl.GL_NEAREST),
            (gl.GL_TEXTURE_WRAP_S, gl.GL_CLAMP_TO_EDGE),
            (gl.GL_TEXTURE_WRAP_T, gl.GL_CLAMP_TO_EDGE),
        ):
            gl.glTexParameteri(gl.GL_TEXTURE_2D, param, value)
        return tex

    def _formats(self, buf: Buffer) -> tuple[Any, Any, Any]:
        """(internal format, format, type) of a buffer's texture on this target."""
        gl = self.gl
        if buf.storage == "float":
            return gl.GL_RGBA32F, gl.GL_RGBA, gl.GL_FLOAT
        return (gl.GL_RGBA if self.name == "es2" else gl.GL_RGBA8), gl.GL_RGBA, gl.GL_UNSIGNED_BYTE

    def _framebuffer(self, tex: Any, index: int) -> Any:
        gl = self.gl
        fbo = gl.glGenFramebuffers(1)
        gl.glBindFramebuffer(gl.GL_FRAMEBUFFER, fbo)
        gl.glFramebufferTexture2D(
            gl.GL_FRAMEBUFFER, gl.GL_COLOR_ATTACHMENT0, gl.GL_TEXTURE_2D, tex, 0
        )
        status = gl.glCheckFramebufferStatus(gl.GL_FRAMEBUFFER)
        if status != gl.GL_FRAMEBUFFER_COMPLETE:
            raise egl.GLUnavailable(
                f"{self.name}: cannot render to a {self.plan.buffers[index].storage} "
                f"texture here (framebuffer status 0x{int(status):x})"
            )
        return fbo

    def _compile(self, kind: Any, source: str) -> Any:
        gl = self.gl
        shader = gl.glCreateShader(kind)
        gl.glShaderSource(shader, source)
        gl.glCompileShader(shader)
        if not gl.glGetShaderiv(shader, gl.GL_COMPILE_STATUS):
            log = gl.glGetShaderInfoLog(shader)
            raise RuntimeError(f"{self.name} shader failed to compile: {log!r}\n{source}")
        return shader

    def _program(self, p: Pass) -> Any:
        gl = self.gl
        prog = gl.glCreateProgram()
        shaders = [
            self._compile(gl.GL_VERTEX_SHADER, self.renderer.vertex()),
            self._compile(gl.GL_FRAGMENT_SHADER, self.renderer.fragment(p, self.plan)),
        ]
        for s in shaders:
            gl.glAttachShader(prog, s)
        gl.glBindAttribLocation(prog, 0, "a_pos")
        gl.glLinkProgram(prog)
        for s in shaders:  # the program keeps what it needs
            gl.glDeleteShader(s)
        if not gl.glGetProgramiv(prog, gl.GL_LINK_STATUS):
            raise RuntimeError(
                f"{self.name} program for {p.label} failed to link: {gl.glGetProgramInfoLog(prog)!r}"
            )
        gl.glUseProgram(prog)
        src, dst = self.plan.buffers[p.src], self.plan.buffers[p.dst]

        def loc(name: str) -> Any:
            return gl.glGetUniformLocation(prog, name)

        gl.glUniform1i(loc("u_src"), 0)
        gl.glUniform1i(loc("u_partial"), 1)
        gl.glUniform2f(loc("u_dec"), *src.decode())
        gl.glUniform2f(loc("u_enc"), *dst.encode())
        if p.op == "conv":
            assert p.weights is not None and p.bias is not None
            gl.glUniformMatrix4fv(loc("u_w"), len(p.taps), gl.GL_FALSE, p.weights)
            gl.glUniform4f(loc("u_bias"), *(float(v) for v in p.bias))
        return prog

    def _reserve(self, batch: int) -> None:
        """Size every atlas for `batch` items (textures only grow)."""
        if batch <= self._capacity:
            return
        gl = self.gl
        for tex, buf in zip(self._textures, self.plan.buffers, strict=True):
            internal, fmt, typ = self._formats(buf)
            gl.glBindTexture(gl.GL_TEXTURE_2D, tex)
            gl.glTexImage2D(
                gl.GL_TEXTURE_2D,
                0,
                internal,
                buf.atlas_width,
                buf.height * batch,
                0,
                fmt,
                typ,
                None,
            )
        frame = self.plan.buffers[0]
        self._staging = np.zeros((batch, frame.groups * 4, frame.height, frame.width), np.uint8)
        self._capacity = batch
        self._set_texel_sizes()

    def _set_texel_sizes(self) -> None:
        """1 / texture size per sampler: GLSL ES 1.00 addresses texel centres in normalised units."""
        gl = self.gl
        for prog, p in zip(self._programs, self.plan.passes, strict=False):
            gl.glUseProgram(prog)
            for name, index in (("u_src_texel", p.src), ("u_partial_texel", p.partial)):
                if index is not None:
                    buf = self.plan.buffers[index]
                    gl.glUniform2f(
                        gl.glGetUniformLocation(prog, name),
                        1.0 / buf.atlas_width,
                        1.0 / (buf.height * self._capacity),
                    )

    # -- running -------------------------------------------------------------------------
    def encode(self, observations: np.ndarray) -> np.ndarray:
        """uint8 (B, C, H, W) -> features (B, F) in the bundle's dtype, as encoder.onnx: uint8
        on the output grid, or float32 (on 8-bit targets: the last stage's stored grid values)."""
        out = self._run_all(observations)
        stored = self.plan.buffers[self.plan.output].storage == "u8"
        if self.ir.output_dtype == "float32":
            if not stored:
                return out.astype(np.float32)
            zp, scale = self.ir.output_zero_point, self.ir.output_scale
            return ((out.astype(np.float32) - zp) * np.float32(scale)).astype(np.float32)
        if stored:
            return out  # the last pass already wrote the output grid
        return quantise_output(self.ir, out)

    def features(self, observations: np.ndarray) -> np.ndarray:
        """float32 (B, F) before output quantisation (float targets); decoded grid values on es2."""
        out = self._run_all(observations)
        buf = self.plan.buffers[self.plan.output]
        if buf.storage == "u8":
            return ((out.astype(np.float32) - buf.zero_point) * np.float32(buf.scale)).astype(
                np.float32
            )
        return out

    def stage_outputs(self, observations: np.ndarray) -> list[np.ndarray]:
        """Every stage's stored output, decoded to float32 (B, C, H, W): for tests and debugging."""
        if len(observations) > self.plan.max_batch():
            raise ValueError(f"stage_outputs takes at most {self.plan.max_batch()} frames at once")
        self._run_all(observations)  # one chunk, so every texture still holds this batch
        outs = []
        for index in self.plan.stage_buffers:
            buf = self.plan.buffers[index]
            raw = self._read(index, len(observations)).astype(np.float32)
            if buf.storage == "u8":
                raw = (raw - buf.zero_point) * np.float32(buf.scale)
            outs.append(raw.reshape(len(observations), buf.channels, buf.height, buf.width))
        return outs

    def _run_all(self, observations: np.ndarray) -> np.ndarray:
        obs = np.asarray(observations)
        want = (self.ir.channels, self.ir.height, self.ir.width)
        if obs.dtype != np.uint8 or obs.ndim != 4 or tuple(obs.shape[1:]) != want:
            raise SplitedgeError(
                f"{self.name} encoder takes uint8 (B, {want[0]}, {want[1]}, {want[2]}) frames, "
                f"got {obs.dtype} {tuple(obs.shape)}"
            )
        step = self.plan.max_batch()
        parts = [self._run(obs[i : i + step]) for i in range(0, len(obs), step)]
        return parts[0] if len(parts) == 1 else np.concatenate(parts)

    def _run(self, obs: np.ndarray) -> np.ndarray:
        gl, plan, b = self.gl, self.plan, len(obs)
        self.ctx.make_current()
        self._reserve(b)
        frame = plan.buffers[0]
        staging = self._staging[:b]
        staging[:, : frame.channels] = obs
        atlas = staging.reshape(b, frame.groups, 4, frame.height, frame.width).transpose(
            0, 3, 1, 4, 2
        )
        gl.glActiveTexture(gl.GL_TEXTURE0)
        gl.glBindTexture(gl.GL_TEXTURE_2D, self._textures[0])
        gl.glTexSubImage2D(
            gl.GL_TEXTURE_2D,
            0,
            0,
            0,
            frame.atlas_width,
            frame.height * b,
            gl.GL_RGBA,
            gl.GL_UNSIGNED_BYTE,
            np.ascontiguousarray(atlas),
        )
        self._bind_vertices()
        bound = None
        for p, prog in zip(plan.passes, self._programs, strict=True):
            dst = plan.buffers[p.dst]
            if bound != p.dst:
                gl.glBindFramebuffer(gl.GL_FRAMEBUFFER, self._fbos[p.dst])
                bound = p.dst
            gl.glViewport(p.group * dst.width, 0, dst.width, dst.height * b)
            gl.glUseProgram(prog)
            gl.glActiveTexture(gl.GL_TEXTURE0)
            gl.glBindTexture(gl.GL_TEXTURE_2D, self._textures[p.src])
            if p.partial is not None:
                gl.glActiveTexture(gl.GL_TEXTURE1)
                gl.glBindTexture(gl.GL_TEXTURE_2D, self._textures[p.partial])
            gl.glDrawArrays(gl.GL_TRIANGLES, 0, 3)
        return self._read(plan.output, b)

    def _read(self, index: int, b: int) -> np.ndarray:
        gl, buf = self.gl, self.plan.buffers[index]
        _, fmt, typ = self._formats(buf)
        out = np.empty(
            (buf.height * b, buf.atlas_width, 4), np.float32 if buf.storage == "float" else np.uint8
        )
        gl.glBindFramebuffer(gl.GL_FRAMEBUFFER, self._fbos[index])
        gl.glReadPixels(0, 0, buf.atlas_width, buf.height * b, fmt, typ, out)
        # atlas (b*H, G*W, 4) -> (b, C, H, W) -> (b, C*H*W): torch's flatten order
        chw = out.reshape(b, buf.height, buf.groups, buf.width, 4).transpose(0, 2, 4, 1, 3)
        chw = chw.reshape(b, buf.groups * 4, buf.height, buf.width)[:, : buf.channels]
        return np.ascontiguousarray(chw.reshape(b, -1))

    def close(self) -> None:
        """Free this encoder's GL objects (the context stays for the process)."""
        if not getattr(self, "_programs", None):
            return
        gl = self.gl
        self.ctx.make_current()
        for prog in self._programs:
            gl.glDeleteProgram(prog)
        gl.glDeleteFramebuffers(len(self._fbos) - 1, self._fbos[1:])
        gl.glDeleteTextures(len(self._textures), self._textures)
        gl.glDeleteBuffers(1, [self._vbo])
        if self._vao is not None:
            gl.glDeleteVertexArrays(1, [self._vao])
        self._programs = []


def from_bundle(
    bundle: Any,
    target: str,
    limits: Limits | None = None,
    act_quant: Sequence[ActQuant] | None = None,
) -> GLEncoder:
    """A GL encoder for a policy bundle; 8-bit targets take the bundle's scales or calibrate their own."""
    enc = bundle.policy["encoder"]
    ir = EncoderIR.from_json(bundle.file(enc["ir"]).read_text())
    weights = load_weights(bundle.file(enc["weights"]))
    note = ""
    if act_quant is None:
        act_quant = from_ir(ir)
        note = ", scales from the bundle"
    if act_quant is None and not egl.context(target).limits().merge(limits).float_storage:
        source = bundle_env(bundle.policy)[0]
        act_quant = calibrate(ir, weights, policy_frames(bundle.policy, CALIBRATION_FRAMES))
        note = (
            f", scales calibrated on {CALIBRATION_FRAMES} {source} frames (the bundle records none)"
        )
    encoder = GLEncoder(ir, weights, target, limits, act_quant)
    if encoder.plan.buffers[encoder.plan.output].storage == "u8":
        encoder.detail += note
    return encoder


def _register(target: str) -> None:
    @register_backend(target)
    def make(bundle: Any, **kwargs: Any) -> GLEncoder:
        return from_bundle(bundle, target, **kwargs)


for _target in ("gl33", "es31", "es2"):
    _register(_target)
