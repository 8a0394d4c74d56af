"""Anti-aliased rasterisation of segments and boxes into small float images (numpy only)."""

from __future__ import annotations

import math

import numpy as np


class Canvas:
    """A (H, W) float32 image in [0, 1] with pixel-centre coordinates cached.

    Each shape is evaluated only inside its bounding box (plus the one-pixel fade):
    outside it the coverage is exactly 0, so the picture is the same as drawing over
    the whole canvas, at a cost that no longer grows with the frame's area.
    """

    def __init__(self, height: int, width: int):
        self.height, self.width = height, width
        ys, xs = np.mgrid[0:height, 0:width].astype(np.float32)
        self._xs, self._ys = xs + 0.5, ys + 0.5
        self.image = np.zeros((height, width), np.float32)

    def clear(self) -> None:
        self.image.fill(0.0)

    def _window(
        self, x_lo: float, x_hi: float, y_lo: float, y_hi: float
    ) -> tuple[slice, slice] | None:
        """Rows and columns whose pixel centres can lie in [lo, hi] (None: off the canvas)."""
        c0, c1 = max(0, math.floor(x_lo - 1.5)), min(self.width, math.ceil(x_hi + 1.5))
        r0, r1 = max(0, math.floor(y_lo - 1.5)), min(self.height, math.ceil(y_hi + 1.5))
        if c0 >= c1 or r0 >= r1:
            return None
        return slice(r0, r1), slice(c0, c1)

    def segment(
        self, x0: float, y0: float, x1: float, y1: float, half_width: float, value: float = 1.0
    ) -> None:
        """Draw a capsule around segment (x0,y0)-(x1,y1); edges fade over one pixel."""
        reach = half_width + 0.5  # coverage is 0 at this distance from the segment and beyond
        win = self._window(min(x0, x1) - reach, max(x0, x1) + reach,
                           min(y0, y1) - reach, max(y0, y1) + reach)  # fmt: skip
        if win is None:
            return
        dx, dy = x1 - x0, y1 - y0
        length2 = dx * dx + dy * dy
        px, py = self._xs[win] - x0, self._ys[win] - y0
        t = np.clip((px * dx + py * dy) / length2, 0.0, 1.0) if length2 > 0 else 0.0
        dist = np.hypot(px - t * dx, py - t * dy)
        cover = np.clip(reach - dist, 0.0, 1.0)
        np.maximum(self.image[win], cover * value, out=self.image[win])

    def box(self, cx: float, cy: float, half_w: float, half_h: float, value: float = 1.0) -> None:
        """Draw an axis-aligned box with anti-aliased edges."""
        rx, ry = half_w + 0.5, half_h + 0.5
        win = self._window(cx - rx, cx + rx, cy - ry, cy + ry)
        if win is None:
            return
        cov_x = np.clip(rx - np.abs(self._xs[win] - cx), 0.0, 1.0)
        cov_y = np.clip(ry - np.abs(self._ys[win] - cy), 0.0, 1.0)
        np.maximum(self.image[win], cov_x * cov_y * value, out=self.image[win])

    def to_uint8(self) -> np.ndarray:
        return (self.image * 255.0 + 0.5).astype(np.uint8)
