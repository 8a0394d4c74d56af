"""Anti-aliased rasterisation of segments and boxes into small float images (numpy only)."""

from __future__ import annotations

import numpy as np


class Canvas:
    """A (H, W) float32 image in [0, 1] with pixel-centre coordinates cached."""

    def __init__(self, height: int, width: int):
        self.height, self.width = height, width
        ys, xs = np.mgrid[0:height, 0:width].astype(np.float32)
        self._xs, self._ys = xs + 0.5, ys + 0.5
        self.image = np.zeros((height, width), np.float32)

    def clear(self) -> None:
        self.image.fill(0.0)

    def segment(
        self, x0: float, y0: float, x1: float, y1: float, half_width: float, value: float = 1.0
    ) -> None:
        """Draw a capsule around segment (x0,y0)-(x1,y1); edges fade over one pixel."""
        dx, dy = x1 - x0, y1 - y0
        length2 = dx * dx + dy * dy
        px, py = self._xs - x0, self._ys - y0
        t = np.clip((px * dx + py * dy) / length2, 0.0, 1.0) if length2 > 0 else 0.0
        dist = np.hypot(px - t * dx, py - t * dy)
        cover = np.clip(half_width + 0.5 - dist, 0.0, 1.0)
        np.maximum(self.image, cover * value, out=self.image)

    def box(self, cx: float, cy: float, half_w: float, half_h: float, value: float = 1.0) -> None:
        """Draw an axis-aligned box with anti-aliased edges."""
        cov_x = np.clip(half_w + 0.5 - np.abs(self._xs - cx), 0.0, 1.0)
        cov_y = np.clip(half_h + 0.5 - np.abs(self._ys - cy), 0.0, 1.0)
        np.maximum(self.image, cov_x * cov_y * value, out=self.image)

    def to_uint8(self) -> np.ndarray:
        return (self.image * 255.0 + 0.5).astype(np.uint8)
