"""The rasteriser draws only inside each shape's bounding box; the picture must be the one
the whole-canvas coverage formula gives (recomputed here independently over every pixel)."""

from __future__ import annotations

import numpy as np

from edge.envs.raster import Canvas


def full_canvas_segment(h: int, w: int, x0, y0, x1, y1, half_width) -> np.ndarray:
    ys, xs = np.mgrid[0:h, 0:w] + 0.5
    d = np.array([x1 - x0, y1 - y0])
    p = np.stack([xs - x0, ys - y0], axis=-1)
    n2 = float(d @ d)
    t = np.clip((p @ d) / n2, 0, 1) if n2 > 0 else np.zeros((h, w))
    dist = np.linalg.norm(p - t[..., None] * d, axis=-1)
    return np.clip(half_width + 0.5 - dist, 0, 1)


def full_canvas_box(h: int, w: int, cx, cy, half_w, half_h) -> np.ndarray:
    ys, xs = np.mgrid[0:h, 0:w] + 0.5
    return np.clip(half_w + 0.5 - abs(xs - cx), 0, 1) * np.clip(half_h + 0.5 - abs(ys - cy), 0, 1)


def test_windowed_drawing_equals_whole_canvas_coverage() -> None:
    rng = np.random.default_rng(0)
    for size in (40, 48, 224):
        canvas = Canvas(size, size + 3)
        for _ in range(40):
            canvas.clear()
            want = np.zeros((size, size + 3))
            # shapes partly or wholly off the canvas too
            x0, y0, x1, y1 = rng.uniform(-0.3 * size, 1.3 * size, 4)
            hw = float(rng.uniform(0.2, 4.0))
            canvas.segment(x0, y0, x1, y1, hw, value=0.8)
            want = np.maximum(want, 0.8 * full_canvas_segment(size, size + 3, x0, y0, x1, y1, hw))
            cx, cy = rng.uniform(-0.2 * size, 1.2 * size, 2)
            bw, bh = rng.uniform(0.1, 0.2 * size, 2)
            canvas.box(cx, cy, bw, bh, value=0.6)
            want = np.maximum(want, 0.6 * full_canvas_box(size, size + 3, cx, cy, bw, bh))
            np.testing.assert_allclose(canvas.image, want, atol=2e-6)


def test_a_point_segment_is_a_disc() -> None:
    canvas = Canvas(20, 20)
    canvas.segment(10.0, 10.0, 10.0, 10.0, half_width=3.0)
    np.testing.assert_allclose(
        canvas.image, full_canvas_segment(20, 20, 10, 10, 10, 10, 3.0), atol=2e-6
    )
