"""Headless GL contexts through EGL, one per target and process, driven with PyOpenGL.

gl33 gets a desktop OpenGL 3.3 core context; es31 and es2 get real OpenGL ES contexts
(EGL_OPENGL_ES_API), so their shaders are compiled by the ES front end. No window, no
display server: Mesa's surfaceless platform (or the device's default display) is enough.
"""

from __future__ import annotations

import ctypes
import os
from dataclasses import dataclass, field
from types import ModuleType
from typing import Any

from edge.encoder.plan import Limits
from splitedge.errors import SplitedgeError

SOFTWARE_RENDERERS = ("llvmpipe", "softpipe", "swrast", "software", "swiftshader", "lavapipe")
# target -> (client API is ES, major, minor)
TARGETS = {"gl33": (False, 3, 3), "es31": (True, 3, 1), "es2": (True, 2, 0)}


class GLUnavailable(SplitedgeError):
    """No GL context of the wanted kind can be made here."""


@dataclass
class GLContext:
    """A current-able EGL context and the PyOpenGL module that drives it."""

    target: str
    gl: Any  # OpenGL.GL, OpenGL.GLES3 or OpenGL.GLES2
    egl: ModuleType
    display: Any
    context: Any
    surface: Any
    version: str = ""
    renderer: str = ""
    extensions: set[str] = field(default_factory=set)

    @property
    def software(self) -> bool:
        """True on a CPU rasteriser such as Mesa llvmpipe."""
        return any(s in self.renderer.lower() for s in SOFTWARE_RENDERERS)

    def make_current(self) -> None:
        """Bind this context to the calling thread (cheap when it already is)."""
        if self.egl.eglGetCurrentContext() == self.context:
            return
        try:
            ok = self.egl.eglMakeCurrent(self.display, self.surface, self.surface, self.context)
        except Exception as e:  # PyOpenGL's EGLError; EGL_BAD_ACCESS when another thread holds it
            ok, why = False, f"{type(e).__name__} {getattr(e, 'err', '')}".strip()
        else:
            why = "eglMakeCurrent returned false"
        if not ok:
            raise GLUnavailable(
                f"{self.target}: cannot bind the GL context to this thread ({why}); "
                "an EGL context is current in one thread at a time, so use each GL "
                "encoder from a single thread"
            )

    def limits(self) -> Limits:
        """What this context reports: texture units, uniform space, texture size, float render targets."""
        gl = self.gl
        if self.target == "gl33":
            vectors = int(gl.glGetIntegerv(gl.GL_MAX_FRAGMENT_UNIFORM_COMPONENTS)) // 4
        else:
            vectors = int(gl.glGetIntegerv(gl.GL_MAX_FRAGMENT_UNIFORM_VECTORS))
        floats = self.target == "gl33" or (
            self.target == "es31" and "GL_EXT_color_buffer_float" in self.extensions
        )
        return Limits(
            max_texture_units=int(gl.glGetIntegerv(gl.GL_MAX_TEXTURE_IMAGE_UNITS)),
            max_uniform_vectors=vectors,
            max_texture_size=int(gl.glGetIntegerv(gl.GL_MAX_TEXTURE_SIZE)),
            float_storage=floats,
            source=f"this {self.target} context",
        )


_CONTEXTS: dict[str, GLContext] = {}


def context(target: str) -> GLContext:
    """The process's context for a target, made on first use and left current."""
    if target not in TARGETS:
        raise SplitedgeError(f"unknown GL target {target!r}; choose from {', '.join(TARGETS)}")
    if target not in _CONTEXTS:
        _CONTEXTS[target] = _create(target)
    ctx = _CONTEXTS[target]
    ctx.make_current()
    return ctx


def _text(value: Any) -> str:
    if value is None:
        return ""
    return (value if isinstance(value, bytes) else ctypes.string_at(value)).decode(errors="replace")


def _import_pyopengl() -> tuple[ModuleType, ModuleType]:
    os.environ.setdefault("PYOPENGL_PLATFORM", "egl")  # must precede PyOpenGL's first import
    os.environ.setdefault("EGL_PLATFORM", "surfaceless")
    try:
        import OpenGL
        from OpenGL import EGL, platform
    except ImportError as e:
        raise GLUnavailable(
            f"the GL encoders need PyOpenGL ({e}); run `pip install PyOpenGL`"
        ) from e
    if "EGL" not in type(platform.PLATFORM).__name__:
        raise GLUnavailable(
            "PyOpenGL was loaded for another platform before splitedge; "
            "set PYOPENGL_PLATFORM=egl in the environment"
        )
    return OpenGL, EGL


def _create(target: str) -> GLContext:
    _, EGL = _import_pyopengl()  # noqa: N806 (the module's own name)
    is_es, major, minor = TARGETS[target]
    try:
        display = EGL.eglGetDisplay(EGL.EGL_DEFAULT_DISPLAY)
        if not display or not EGL.eglInitialize(display, None, None):
            raise GLUnavailable(f"{target}: no EGL display (is Mesa's libegl1 installed?)")
        EGL.eglBindAPI(EGL.EGL_OPENGL_ES_API if is_es else EGL.EGL_OPENGL_API)
        attrs = [EGL.EGL_CONTEXT_MAJOR_VERSION, major, EGL.EGL_CONTEXT_MINOR_VERSION, minor]
        if not is_es:
            attrs += [EGL.EGL_CONTEXT_OPENGL_PROFILE_MASK, EGL.EGL_CONTEXT_OPENGL_CORE_PROFILE_BIT]
        attrs.append(EGL.EGL_NONE)
        config, surface = _config_and_surface(EGL, display, is_es)
        ctx = EGL.eglCreateContext(
            display, config, EGL.EGL_NO_CONTEXT, (EGL.EGLint * len(attrs))(*attrs)
        )
        if not ctx or not EGL.eglMakeCurrent(display, surface, surface, ctx):
            raise GLUnavailable(
                f"{target}: EGL refused an {'ES' if is_es else 'OpenGL'} {major}.{minor} context"
            )
    except GLUnavailable:
        raise
    except Exception as e:  # PyOpenGL raises its own error types (EGLError, NullFunctionError)
        raise GLUnavailable(
            f"{target}: cannot create a GL context: {type(e).__name__}: {e}".splitlines()[0]
        ) from e
    from OpenGL import GL, GLES2, GLES3

    gl: Any = (GLES3 if major >= 3 else GLES2) if is_es else GL
    out = GLContext(
        target,
        gl,
        EGL,
        display,
        ctx,
        surface,
        version=_text(gl.glGetString(gl.GL_VERSION)),
        renderer=_text(gl.glGetString(gl.GL_RENDERER)),
    )
    if is_es and not out.version.startswith("OpenGL ES"):
        raise GLUnavailable(f"{target}: asked EGL for OpenGL ES but got {out.version!r}")
    if major >= 3:
        count = int(gl.glGetIntegerv(gl.GL_NUM_EXTENSIONS))
        out.extensions = {_text(gl.glGetStringi(gl.GL_EXTENSIONS, i)) for i in range(count)}
    else:
        out.extensions = set(_text(gl.glGetString(gl.GL_EXTENSIONS)).split())
    return out


def _config_and_surface(EGL: Any, display: Any, is_es: bool) -> tuple[Any, Any]:  # noqa: N803
    """No config and no surface where EGL allows it (Mesa does); else a 1x1 pbuffer."""
    exts = _text(EGL.eglQueryString(display, EGL.EGL_EXTENSIONS)).split()
    if "EGL_KHR_no_config_context" in exts and "EGL_KHR_surfaceless_context" in exts:
        return EGL.EGLConfig(), EGL.EGL_NO_SURFACE
    bit = EGL.EGL_OPENGL_ES2_BIT if is_es else EGL.EGL_OPENGL_BIT
    wanted = [EGL.EGL_RENDERABLE_TYPE, bit, EGL.EGL_SURFACE_TYPE, EGL.EGL_PBUFFER_BIT, EGL.EGL_NONE]
    config, count = EGL.EGLConfig(), EGL.EGLint()
    EGL.eglChooseConfig(
        display,
        (EGL.EGLint * len(wanted))(*wanted),
        ctypes.pointer(config),
        1,
        ctypes.pointer(count),
    )
    if count.value < 1:
        raise GLUnavailable("EGL offers no pbuffer config for this API")
    size = (EGL.EGLint * 5)(EGL.EGL_WIDTH, 1, EGL.EGL_HEIGHT, 1, EGL.EGL_NONE)
    return config, EGL.eglCreatePbufferSurface(display, config, size)
