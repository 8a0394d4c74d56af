"""Device encoders: uint8 observations (B, C, H, W) -> uint8 features (B, F).

Every backend implements the same small interface and is checked against the
same reference. Backends register by name; `make_encoder` picks one.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Protocol

import numpy as np

from splitedge.errors import SplitedgeError


class Encoder(Protocol):
    """A compiled, persistent encoder for one bundle."""

    name: str

    def encode(self, observations: np.ndarray) -> np.ndarray:
        """uint8 (B, C, H, W) -> uint8 (B, F) quantised features."""
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


def make_encoder(bundle: Any, backend: str = "auto") -> tuple[Encoder, str]:
    """An encoder for a policy bundle, and a one-line reason for the backend chosen."""
    _load()
    if backend == "auto":
        return _BACKENDS["ort"](bundle), "ort: CPU fallback (no GL backend selected)"
    if backend not in _BACKENDS:
        raise SplitedgeError(
            f"unknown encoder backend {backend!r}; choose from auto, {', '.join(sorted(_BACKENDS))}"
        )
    return _BACKENDS[backend](bundle), f"{backend}: requested"


def _load() -> None:
    from edge.encoder import ort  # noqa: F401  (registers itself)
