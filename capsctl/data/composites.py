"""Multi-digit composites and their scoring: the paired-digit test (a contract others recompute).

Test images x (N, H, W, 1), labels y. `rng = numpy.random.default_rng(seed)`; for each extra digit
`idx = rng.permutation(N)`; images are concatenated along height ('vertical', first on top) or
width ('horizontal'); composites whose labels are not all different are dropped. The prediction is
the set of the k highest scores; `accuracy`: that set equals the label set; `confident_accuracy`:
and the k-th highest score is > 0.5.

'overlap' (MultiMNIST style, our extension): after the permutations, `rng.integers(0, 2*shift+1,
size=(N, k, 2))` gives each digit's (row, col) offset in a (H+2*shift, W+2*shift) canvas, and
the digits are merged with a pixel-wise maximum. Gray digits of dark ink on a light background (a
model's spec `background: "light"`) are merged by the maximum of their ink, 1 − max(1 − x), on a white
canvas: a maximum of light images would be a blank canvas.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from capsctl.choices import LAYOUTS
from capsctl.errors import CapsctlError

OVERLAP_SHIFT = 4


@dataclass(frozen=True)
class Composites:
    images: np.ndarray  # float32 (M, H', W', 1)
    labels: np.ndarray  # int64 (M, k), in placement order (top→bottom / left→right)
    layout: str
    seed: int
    indices: np.ndarray | None = None  # int64 (M, k): the source images of each composite, in placement order
    # int64 (M, k, 2), 'overlap' only: each digit's (row, col) in the canvas (its top left corner)
    offsets: np.ndarray | None = None
    light: bool = False  # 'overlap': dark ink on light digits, merged on a white canvas (module doc)


def make_composites(
    x: np.ndarray,
    y: np.ndarray,
    *,
    digits: int = 2,
    layout: str = "vertical",
    seed: int = 0,
    limit: int | None = None,
    light: bool = False,
) -> Composites:
    """The composites of the module doc; `light`: the digits are dark ink on a light background."""
    if layout not in LAYOUTS:
        raise CapsctlError(f"--layout must be one of {', '.join(LAYOUTS)}, got {layout!r}")
    if digits < 2:
        raise CapsctlError(f"--digits must be at least 2, got {digits}")
    if limit is not None and limit < 1:
        raise CapsctlError(f"--limit must be at least 1, got {limit}")
    if isinstance(seed, bool) or not isinstance(seed, int | np.integer) or seed < 0:
        raise CapsctlError(f"--seed must be a whole number 0 or more, got {seed}")
    classes = len(np.unique(y))
    if digits > classes:  # (no composite of `digits` different classes: scoring found none to score)
        raise CapsctlError(f"--digits {digits}: the images hold {classes} classes, and each composite needs "
                           f"{digits} different ones")
    n = len(x)
    rng = np.random.default_rng(seed)
    order = [np.arange(n)] + [rng.permutation(n) for _ in range(digits - 1)]
    idx = np.stack(order, axis=1)  # (N, k)
    labels = y[idx]
    # all different <=> sorted neighbours differ
    srt = np.sort(labels, axis=1)
    keep = np.all(srt[:, 1:] != srt[:, :-1], axis=1)
    offsets = rng.integers(0, 2 * OVERLAP_SHIFT + 1, size=(n, digits, 2)) if layout == "overlap" else None
    keep_idx = np.flatnonzero(keep)
    if limit is not None:
        keep_idx = keep_idx[:limit]
    idx, labels = idx[keep_idx], labels[keep_idx]
    parts = x[idx]  # (M, k, H, W, 1)
    if layout == "vertical":
        images = np.concatenate(list(parts.transpose(1, 0, 2, 3, 4)), axis=1)
    elif layout == "horizontal":
        images = np.concatenate(list(parts.transpose(1, 0, 2, 3, 4)), axis=2)
    else:
        assert offsets is not None
        offsets = offsets[keep_idx]
        images = overlay(parts, offsets, light)
    return Composites(
        np.ascontiguousarray(images, dtype=np.float32), labels, layout, seed, idx, offsets, light and
        layout == "overlap"
    )


def overlay(parts: np.ndarray, offsets: np.ndarray, light: bool = False) -> np.ndarray:
    """The 'overlap' layout: digits `parts` (M, k, H, W, C), digit j of composite m placed with its top
    left corner at `offsets[m, j]` = (row, col) in 0..2*OVERLAP_SHIFT of a zero (H+2s, W+2s) canvas,
    merged by pixel-wise maximum; float32 (M, H+2s, W+2s, C), s = OVERLAP_SHIFT. `light` (dark ink on
    light): the same on the ink, 1 - overlay(1 - parts), so the canvas is white and dark ink wins."""
    if light:
        return 1.0 - overlay(1.0 - np.asarray(parts, np.float32), offsets)
    m, k, h, w, c = parts.shape
    s = OVERLAP_SHIFT
    images = np.zeros((m, h + 2 * s, w + 2 * s, c), np.float32)
    rows = np.arange(m)[:, None, None]
    for j in range(k):
        r = offsets[:, j, 0][:, None, None] + np.arange(h)[None, :, None]
        q = offsets[:, j, 1][:, None, None] + np.arange(w)[None, None, :]
        images[rows, r, q] = np.maximum(images[rows, r, q], parts[:, j])
    return images


def set_matches(scores: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per composite: (top-k set == label set, and also the k-th score > 0.5), k = labels.shape[1]."""
    k = labels.shape[1]
    top = np.argsort(-scores, axis=1, kind="stable")[:, :k]
    correct = np.all(np.sort(top, axis=1) == np.sort(labels, axis=1), axis=1)
    kth = np.take_along_axis(scores, top[:, k - 1 : k], axis=1)[:, 0]
    return correct, correct & (kth > 0.5)


def score_sets(scores: np.ndarray, labels: np.ndarray) -> dict[str, float | int]:
    """Accuracy and confident accuracy of top-k sets against label sets (k = labels.shape[1])."""
    m = len(labels)
    if m == 0:
        raise CapsctlError("no composites to score")
    correct, confident = set_matches(scores, labels)
    return {"pairs": m, "accuracy": float(correct.mean()), "confident_accuracy": float(confident.mean())}


def single_accuracy(scores: np.ndarray, labels: np.ndarray) -> float:
    return float((np.argmax(scores, axis=1) == labels).mean())


def alone(comp: Composites, position: int, sources: np.ndarray, in_canvas: bool = False) -> Composites:
    """The digit at `position` of each composite alone, as a one-digit 'composite': its source image,
    or with `in_canvas` (an overlap composite, for a decoder that draws the canvas) that image at its
    place in the canvas."""
    assert comp.indices is not None
    idx = comp.indices[:, position : position + 1]
    labels = comp.labels[:, position : position + 1]
    if not in_canvas:
        return Composites(sources[idx[:, 0]], labels, "alone", comp.seed, idx)
    assert comp.offsets is not None
    offsets = comp.offsets[:, position : position + 1]
    return Composites(
        overlay(sources[idx], offsets, comp.light), labels, "alone", comp.seed, idx, offsets, comp.light
    )


def reconstruction_errors(
    runner: Any, comp: Composites, sources: np.ndarray, batch_size: int = 256
) -> np.ndarray:
    """(M, k): mean squared error per pixel of each digit of each composite, reconstructed by the
    model's decoder from that digit's own capsule (its label's) in the composite, against the source
    test digit alone (`sources[comp.indices]`). A decoder trained on single digits draws a digit at
    the training image size (28x28 for MNIST), so it is compared with the 28x28 source digit, not with
    the digit's place in the larger composite: the score says how well one capsule of the composite
    holds that digit. A decoder trained on overlap composites (`train --compose overlap`) draws the
    whole canvas: its digit is compared with the source digit alone at its place in the canvas."""
    if comp.indices is None:
        raise CapsctlError("composites without their source indices cannot be scored for reconstruction")
    m, k = comp.labels.shape
    errors = np.zeros((m, k), np.float64)
    for start in range(0, m, batch_size):
        images = comp.images[start : start + batch_size]
        for p in range(k):
            recon = runner.reconstruct(images, comp.labels[start : start + batch_size, p])
            target = sources[comp.indices[start : start + batch_size, p]]
            if comp.offsets is not None and recon.shape[1:] == images.shape[1:]:  # it draws the canvas
                target = overlay(
                    target[:, None], comp.offsets[start : start + batch_size, p : p + 1], comp.light
                )
            if recon.shape[1:] != target.shape[1:]:
                raise CapsctlError(
                    f"the decoder draws {list(recon.shape[1:])} images, the source digits are "
                    f"{list(target.shape[1:])}"
                )
            diff = np.asarray(recon, np.float64) - target
            errors[start : start + len(images), p] = (diff * diff).reshape(len(diff), -1).mean(axis=1)
    return errors
