"""Random shifts and zooms of training images, drawn from a numpy generator the loop seeds per step."""

from __future__ import annotations

import numpy as np


def shift_batch(x: np.ndarray, shift: int, rng: np.random.Generator) -> np.ndarray:
    """Translate each image by its own random (dy, dx) in [-shift, shift], filling with zeros."""
    if shift == 0:
        return x
    b, h, w, c = x.shape
    pad = np.zeros((b, h + 2 * shift, w + 2 * shift, c), x.dtype)
    pad[:, shift : shift + h, shift : shift + w] = x
    d = rng.integers(0, 2 * shift + 1, size=(b, 2))
    rows = d[:, 0, None, None] + np.arange(h)[None, :, None]
    cols = d[:, 1, None, None] + np.arange(w)[None, None, :]
    return pad[np.arange(b)[:, None, None], rows, cols]


def augment_batch(
    x: np.ndarray, shift: int, scale: float, rng: np.random.Generator, light: bool = False
) -> np.ndarray:
    """Zoom each image about its centre by its own factor in [1 - scale, 1 + scale], then shift it.

    `light` (gray images of dark ink on light, the spec's background): the same on the ink, 1 - f(1 - x),
    so what comes into view is white like the images' background, not a black band.

    Without zoom this is exactly `shift_batch` (same random draws), so runs without --scale are
    unchanged. The zoom is axis-aligned, so it is separable: out = Ry @ image @ Rxᵀ, where each
    row of Ry holds the bilinear (hat-function) weights of one output row's source position;
    sources outside the image get no weight, which fills with zeros.
    """
    if light and (shift or scale):
        return np.asarray(1 - augment_batch(1 - x, shift, scale, rng), x.dtype)
    if scale == 0:
        return shift_batch(x, shift, rng)
    b, h, w, _ = x.shape
    s = rng.uniform(1 - scale, 1 + scale, size=(b, 1))
    d = rng.integers(-shift, shift + 1, size=(b, 2)) if shift else np.zeros((b, 2), np.int64)
    cy, cx = (h - 1) / 2, (w - 1) / 2
    src_r = (np.arange(h)[None, :] - d[:, :1] - cy) / s + cy  # (b, h): source row of each output row
    src_c = (np.arange(w)[None, :] - d[:, 1:] - cx) / s + cx
    ry = np.maximum(0.0, 1.0 - np.abs(src_r[:, :, None] - np.arange(h)[None, None, :])).astype(x.dtype)
    rx = np.maximum(0.0, 1.0 - np.abs(src_c[:, :, None] - np.arange(w)[None, None, :])).astype(x.dtype)
    return np.einsum("bik,bklc,bjl->bijc", ry, x, rx, optimize=True)
