"""Pass plan -> GLSL: one renderer walks a pass; a small subclass per target supplies the tables.

Everything that needs thought (packing, splitting, limits) happened in plan.py, so this is
a straight walk. Weights, biases and scales are uniforms, never literals: the text depends
only on the pass's shape. Geometry (sizes, strides, offsets) is literal.
"""

from __future__ import annotations

from edge.encoder.plan import Buffer, Pass, Plan


def _f(v: float) -> str:
    return repr(float(v))


class Renderer:
    """GLSL text for a pass; subclasses override the class attributes and `fetch`."""

    target = ""
    glsl = ""  # the GLSL version this target compiles
    version = ""
    precision = ""
    vertex_in = "in"
    out_decl = "out vec4 frag_color;"
    out_var = "frag_color"

    def fetch(self, sampler: str, x: str, y: str) -> str:
        """Expression sampling texel (x, y) (floats holding integers) of `sampler` (size in `<sampler>_texel`)."""
        return f"texelFetch({sampler}, ivec2(int({x}), int({y})), 0)"

    def vertex(self) -> str:
        """Full-screen triangle; the viewport picks the region a pass writes."""
        return (
            f"{self.version}\n{self.vertex_in} vec2 a_pos;\n"
            "void main() { gl_Position = vec4(a_pos, 0.0, 1.0); }\n"
        )

    def fragment(self, p: Pass, plan: Plan) -> str:
        """The fragment shader computing one output group of one pass."""
        src, dst = plan.buffers[p.src], plan.buffers[p.dst]
        head = [
            self.version,
            self.precision,
            "uniform sampler2D u_src;",
            "uniform vec2 u_src_texel;",
            "uniform vec2 u_dec;  // x = sampled * u_dec.x + u_dec.y",
            "uniform vec2 u_enc;  // 8-bit storage: q = x * u_enc.x + u_enc.y",
        ]
        if p.partial is not None:
            head += ["uniform sampler2D u_partial;", "uniform vec2 u_partial_texel;"]
        if p.op == "conv":
            head += [
                "uniform vec4 u_bias;",
                f"uniform mat4 u_w[{len(p.taps)}];  // (in x out) per tap",
            ]
        head.append(self.out_decl)
        lo, hi = "vec2(0.0)", f"vec2({_f(src.width - 1)}, {_f(src.height - 1)})"
        funcs = [
            "vec4 src_at(float x, float y) {",
            f"  return {self.fetch('u_src', 'x', 'y')} * u_dec.x + u_dec.y;",
            "}",
            "vec4 src_in(vec2 c, float x0, float row0) {  // zero outside the image (padding)",
            f"  vec2 cc = clamp(c, {lo}, {hi});",
            "  return c == cc ? src_at(x0 + cc.x, row0 + cc.y) : vec4(0.0);",
            "}",
        ]
        body = [
            "void main() {",
            "  vec2 p = floor(gl_FragCoord.xy);  // this texel of the destination atlas",
            f"  float item = floor((p.y + 0.5) / {_f(dst.height)});  // batch item",
            f"  vec2 o = vec2(p.x - {_f(p.group * dst.width)}, p.y - item * {_f(dst.height)});",
            f"  vec2 base = o * {_f(p.stride)} - {_f(p.padding)};",
            f"  float row0 = item * {_f(src.height)};",
        ]
        if p.op == "conv":
            body += self._conv_loop(p, src.width)
        else:
            body += self._pool_loop(p, src)
        body += self._finish(p, dst.storage)
        body += [f"  {self.out_var} = acc;", "}"]
        return "\n".join([*head, *funcs, *body]) + "\n"

    def _conv_loop(self, p: Pass, src_width: int) -> list[str]:
        # A loop, not unrolled text: llvmpipe's LLVM takes seconds on ~100 unrolled taps, and
        # device compilers unroll constant-bound loops themselves. A pass's taps are a
        # contiguous run of the (group, ky, kx) enumeration, so the tap index decodes to them.
        k = p.kernel
        g0, ky0, kx0 = p.taps[0]
        first = (g0 * k + ky0) * k + kx0
        if [(g * k + ky) * k + kx for g, ky, kx in p.taps] != list(
            range(first, first + len(p.taps))
        ):
            raise ValueError(f"{self.target}: taps of {p.label} are not contiguous")
        start = "vec4(0.0)" if p.partial is None else self.fetch("u_partial", "p.x", "p.y")
        offset = "vec2(float(kx), float(ky))"
        if p.padding:
            sample = f"src_in(base + {offset}, float(g * {src_width}), row0)"
        else:
            sample = (
                f"src_at(float(g * {src_width}) + base.x + float(kx), row0 + base.y + float(ky))"
            )
        return [
            f"  vec4 acc = {start};",
            f"  for (int t = 0; t < {len(p.taps)}; t++) {{",
            f"    int n = t + {first};",
            f"    int g = n / {k * k};",
            f"    int ky = (n - g * {k * k}) / {k};",
            f"    int kx = n - g * {k * k} - ky * {k};",
            f"    acc += u_w[t] * {sample};",
            "  }",
        ]

    def _pool_loop(self, p: Pass, src: Buffer) -> list[str]:
        # Every pool window holds at least one image texel (padding <= kernel // 2, floor
        # mode), and clamping a padded offset to the image edge lands on a texel of the same
        # window: so a max over clamped samples is torch's max with -inf padding. An average
        # counts padded texels as zeros in a k*k divisor (count_include_pad=True).
        k, x0 = p.kernel, _f(p.group * src.width)
        hi = f"vec2({_f(src.width - 1)}, {_f(src.height - 1)})"

        def at(offset: str) -> str:
            c = f"base + {offset}"
            if p.padding and p.op == "maxpool":
                c = f"clamp({c}, vec2(0.0), {hi})"
            elif p.padding:
                return f"src_in({c}, {x0}, row0)"
            return f"src_at({x0} + ({c}).x, row0 + ({c}).y)"

        sample = at("vec2(float(kx), float(ky))")
        if p.op == "maxpool":
            start, update, end = at("vec2(0.0)"), f"acc = max(acc, {sample});", []
        elif p.op == "avgpool":
            start, update, end = "vec4(0.0)", f"acc += {sample};", [f"  acc = acc / {_f(k * k)};"]
        else:
            raise ValueError(f"{self.target}: no shader for op {p.op!r} (layer {p.label})")
        return [
            f"  vec4 acc = {start};",
            f"  for (int ky = 0; ky < {k}; ky++) {{",
            f"    for (int kx = 0; kx < {k}; kx++) {{",
            f"      {update}",
            "    }",
            "  }",
            *end,
        ]

    def _finish(self, p: Pass, storage: str) -> list[str]:
        if not p.finish:
            return []  # a partial sum: stored as is, for the next chunk
        lines = ["  acc += u_bias;"] if p.op == "conv" else []
        if p.relu:
            lines.append("  acc = max(acc, 0.0);")
        if storage == "u8":  # RGBA8 stores q / 255 exactly for integer q
            lines.append("  acc = clamp(floor(acc * u_enc.x + u_enc.y + 0.5), 0.0, 255.0) / 255.0;")
        return lines


class GL33Renderer(Renderer):
    """Desktop OpenGL 3.3 core (Jetson Nano)."""

    target, glsl, version = "gl33", "GLSL 3.30", "#version 330 core"


class ES31Renderer(Renderer):
    """OpenGL ES 3.1, GLSL ES 3.10 (Raspberry Pi 4B)."""

    target, glsl, version = "es31", "GLSL ES 3.10", "#version 310 es"
    precision = "precision highp float;\nprecision highp int;\nprecision highp sampler2D;"


class ES2Renderer(Renderer):
    """OpenGL ES 2.0, GLSL ES 1.00 (Raspberry Pi Zero 2 W): no texelFetch, so texel centres by hand."""

    target, glsl, version = "es2", "GLSL ES 1.00", "#version 100"
    # samplers default to lowp in GLSL ES 1.00 and Mesa honours it: texture2D results then lose
    # ~1e-3 relative and 8-bit storage rounds the wrong way, so ask for highp wherever it exists
    precision = (
        "#ifdef GL_FRAGMENT_PRECISION_HIGH\nprecision highp float;\nprecision highp sampler2D;\n"
        "#else\nprecision mediump float;\n#endif"
    )
    vertex_in = "attribute"
    out_decl = ""
    out_var = "gl_FragColor"

    def fetch(self, sampler: str, x: str, y: str) -> str:
        # NEAREST filtering at the exact centre of texel (x, y): no neighbour can leak in
        return f"texture2D({sampler}, (vec2({x}, {y}) + 0.5) * {sampler}_texel)"


RENDERERS: dict[str, type[Renderer]] = {
    r.target: r for r in (GL33Renderer, ES31Renderer, ES2Renderer)
}
