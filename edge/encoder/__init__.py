"""Device encoders: uint8 observations (B, C, H, W) -> features (B, F).

Features come in the bundle's dtype (manifest policy.encoder.output.dtype): uint8 quantised
with its scale/zero_point, or float32 for a model trained without quantisation.

Every backend implements the same small interface and is checked against the
same reference. Backends register by name; `make_encoder` picks one.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any, Protocol

import numpy as np

from splitedge.errors import SplitedgeError


class Encoder(Protocol):
    """A compiled, persistent encoder for one bundle."""

    name: str

    def encode(self, observations: np.ndarray) -> np.ndarray:
        """uint8 (B, C, H, W) -> (B, F) features: uint8 quantised or float32, as the bundle says."""
        ...

    def close(self) -> None: ...


_BACKENDS: dict[str, Callable[..., Encoder]] = {}


def register_backend(name: str) -> Callable[[Callable[..., Encoder]], Callable[..., Encoder]]:
    def deco(factory: Callable[..., Encoder]) -> Callable[..., Encoder]:
        _BACKENDS[name] = factory
        return factory

    return deco


def backends() -> list[str]:
    _load()
    return sorted(_BACKENDS)


def make_encoder(bundle: Any, backend: str = "auto", **options: Any) -> tuple[Encoder, str]:
    """An encoder for a policy bundle, and a one-line reason for the backend chosen.

    `options` go to the backend's factory (e.g. `limits=` a device profile's limits for GL).
    """
    _load()
    if backend == "auto":
        backend, why = choose_auto()
        encoder = _BACKENDS[backend](bundle, **(options if backend != "ort" else {}))
        return encoder, _reason(encoder, backend, why)
    if backend not in _BACKENDS:
        raise SplitedgeError(
            f"unknown encoder backend {backend!r}; choose from auto, {', '.join(sorted(_BACKENDS))}"
        )
    encoder = _BACKENDS[backend](bundle, **options)
    return encoder, _reason(encoder, backend, "requested")


GL_PREFERENCE = ("gl33", "es31", "es2")  # most capable first: float storage before 8-bit


_AUTO_LOCK = threading.Lock()
_AUTO_CHOICE: tuple[str, str] | None = None


def choose_auto() -> tuple[str, str]:
    """(backend, why), probed once per process.

    An EGL context is current on one thread at a time, so concurrent clients must not each
    probe: the first caller decides under a lock and everyone reuses its answer.
    """
    global _AUTO_CHOICE
    with _AUTO_LOCK:
        if _AUTO_CHOICE is None:
            _AUTO_CHOICE = _probe_auto()
        return _AUTO_CHOICE


def _probe_auto() -> tuple[str, str]:
    """A GL target on a real GPU, onnxruntime on a software renderer or without GL."""
    from edge.encoder import egl

    failures = []
    for target in GL_PREFERENCE:
        try:
            ctx = egl.context(target)
        except SplitedgeError as e:
            failures.append(str(e))
            continue
        if ctx.software:
            return "ort", (
                f"the only GL here is {ctx.renderer}, a CPU rasteriser, where onnxruntime is "
                "faster; pass --backend gl33|es31|es2 to force GL"
            )
        return target, f"{ctx.renderer} ({ctx.version}) is a GPU"
    return "ort", f"no GL context ({failures[-1] if failures else 'none tried'})"


def _reason(encoder: Any, backend: str, why: str) -> str:
    detail = getattr(encoder, "detail", "")
    return f"{backend}: {why}" + (f"; {detail}" if detail else "")


def _load() -> None:
    from edge.encoder import gl, ort  # noqa: F401  (register themselves)
