"""What the reconstruction decoder draws: `capsctl inspect --reconstruct` and `--perturb`.

The decoder redraws a digit at the training image size (H, W) from one output capsule, every other
capsule set to zero (Sabour et al. 2017). For an input larger than that (a composite), each
reconstruction is placed centred on its class's evidence (the inspection's centre of mass), so the
overlay shows which part of the input each capsule explains (their fig. 5); `--perturb` moves each
dimension of one capsule from -range to +range and redraws (their fig. 4).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from capsctl.errors import CapsctlError
from capsctl.inspect.analysis import Inspection
from capsctl.inspect.figure import plain_text
from capsctl.model.spec import ModelSpec

OVERLAY_COLOURS = ((1.0, 0.2, 0.2), (0.2, 1.0, 0.2), (0.3, 0.5, 1.0), (1.0, 0.9, 0.2), (1.0, 0.3, 1.0))
OVERLAY_NAMES = ("red", "green", "blue", "yellow", "magenta")
MAX_PERTURB_STEPS = 51
MAX_RECONSTRUCTED = 5  # the highest-scoring of the predicted classes
MAX_PERTURB_RANGE = 5.0


def check_decoder(spec: ModelSpec, model: object, option: str) -> None:
    """One line naming why `option` cannot run on the model file `model`."""
    if spec.head != "capsule":
        raise CapsctlError(f"{option}: {model} has a pooling head, which has no capsules to reconstruct from")
    if spec.decoder is None:
        raise CapsctlError(f"{option}: {model} has no reconstruction decoder (train one with --decoder)")


def check_perturb(spec: ModelSpec, cls: int | None, value_range: float, steps: int) -> None:
    j = spec.num_classes
    if cls is not None and not 0 <= cls < j:
        raise CapsctlError(f"--class must be in 0..{j - 1}, got {cls}")
    if not (np.isfinite(value_range) and 0 < value_range <= MAX_PERTURB_RANGE):
        raise CapsctlError(f"--range must be in (0, {MAX_PERTURB_RANGE:g}], got {value_range}")
    if not 2 <= steps <= MAX_PERTURB_STEPS:
        raise CapsctlError(f"--steps must be in 2..{MAX_PERTURB_STEPS}, got {steps}")


def reconstruct_classes(res: Inspection, cls: int | None) -> list[int]:
    """The capsules to reconstruct from: --class, else the predicted (or --top) classes, else the best."""
    if cls is not None:
        return [cls]
    chosen = list(res.selected) or [int(np.argmax(res.scores))]
    return sorted(chosen, key=lambda j: -res.scores[j])[:MAX_RECONSTRUCTED]


def perturbations(runner: Any, x: np.ndarray, cls: int, value_range: float, steps: int) -> np.ndarray:
    """(D, steps, H, W, C): capsule `cls` of image x (1, H, W, C) with dimension d moved by each offset."""
    v = runner.capsules(x)[0]  # (J, D)
    keep = np.zeros_like(v)
    keep[cls] = v[cls]
    d = v.shape[1]
    offsets = np.linspace(-value_range, value_range, steps)
    batch = np.repeat(keep[None], d * steps, axis=0).reshape(d, steps, *v.shape)
    for k in range(d):
        batch[k, :, cls, k] += offsets
    out = runner.decode(batch.reshape(d * steps, *v.shape).astype(np.float32))
    return out.reshape(d, steps, *out.shape[1:])


def placement(res: Inspection, cls: int, shape: tuple[int, int]) -> tuple[int, int]:
    """Top-left corner (row, col) of an (h, w) reconstruction in the input: centred on the class's
    evidence when the input is larger, clipped to the image; (0, 0) for an input of the same size."""
    h, w = shape
    H, W = res.image_shape
    centre = None if res.centres is None else res.centres[cls]
    if centre is None or np.isnan(centre).any():
        centre = np.array([(H - 1) / 2, (W - 1) / 2])
    top = round(float(centre[0]) - (h - 1) / 2)
    left = round(float(centre[1]) - (w - 1) / 2)
    return max(0, min(top, H - h)), max(0, min(left, W - w))


def overlay(
    image: np.ndarray, recons: dict[int, np.ndarray], res: Inspection, light: bool = False
) -> np.ndarray:
    """RGB (H, W, 3): the input's ink in dim gray, each class's reconstructed ink added in its own colour.

    A colour input and colour reconstructions enter as their gray mean: the overlay's colours name
    the classes, so the input's own colours would only confuse them. `light` (a model of dark ink on
    light): the ink is 1 - value (else the paper was painted and the strokes left dark)."""
    gray = image if image.ndim == 2 else image.mean(axis=2)
    gray = 1.0 - gray if light else gray
    rgb = np.repeat(0.35 * gray[..., None], 3, axis=-1)
    for i, (j, rec) in enumerate(recons.items()):
        r = 1.0 - rec.mean(axis=-1) if light else rec.mean(axis=-1)
        h, w = min(r.shape[0], gray.shape[0]), min(r.shape[1], gray.shape[1])
        top, left = placement(res, j, (h, w))
        colour = np.asarray(OVERLAY_COLOURS[i % len(OVERLAY_COLOURS)])
        rgb[top : top + h, left : left + w] += r[:h, :w, None] * colour
    return np.clip(rgb, 0.0, 1.0)


def _show(ax: Any, image: np.ndarray) -> None:
    """A gray (H, W) or (H, W, 1) image, or an RGB (H, W, 3) one in colour, values 0..1."""
    if image.ndim == 3 and image.shape[2] == 3:
        ax.imshow(np.clip(image, 0.0, 1.0), interpolation="nearest")
    else:
        gray = image if image.ndim == 2 else image[..., 0]
        ax.imshow(gray, cmap="gray", vmin=0, vmax=1, interpolation="nearest")


@plain_text
def save_reconstruct_figure(
    path: Path,
    image: np.ndarray,
    recons: dict[int, np.ndarray],
    res: Inspection,
    title: str,
    names: Sequence[str] | None = None,
    light: bool = False,
) -> None:
    """`image` gray (H, W) or RGB (H, W, 3); `recons` (h, w, C) per class; `names` the class names;
    `light`: the model's images are dark ink on light (the overlay marks the ink)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    from capsctl.inspect.figure import _write, check_out_path

    fmt = check_out_path(path)
    n = len(recons) + 2
    fig = Figure(figsize=(2.2 * n, 3.0), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, n, squeeze=False)[0]
    label = {j: str(j) if names is None else names[j] for j in recons}
    _show(axes[0], image)
    axes[0].set_title(f"input {image.shape[0]}×{image.shape[1]}", fontsize=9)
    for i, (j, rec) in enumerate(recons.items(), start=1):
        _show(axes[i], rec)
        axes[i].set_title(f"from capsule {label[j]}\n(length {res.scores[j]:.2f})", fontsize=9)
    axes[-1].imshow(overlay(image, recons, res, light), interpolation="nearest")
    key = ", ".join(f"{OVERLAY_NAMES[i % len(OVERLAY_NAMES)]} {label[j]}" for i, j in enumerate(recons))
    axes[-1].set_title(f"overlay on input\n({key})", fontsize=9)
    for ax in axes:
        ax.set_xticks([])
        ax.set_yticks([])
    fig.suptitle(title, fontsize=9)
    _write(fig, path, fmt)


@plain_text
def save_perturb_figure(
    path: Path, grid: np.ndarray, cls: int, value_range: float, title: str, name: str | None = None
) -> None:
    """`grid` (D, steps, h, w, C) from perturbations(); C = 3 is drawn in colour; `name` the class's."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    from capsctl.inspect.figure import _write, check_out_path

    fmt = check_out_path(path)
    d, steps = grid.shape[:2]
    h, w = grid.shape[2:4]
    channels = 3 if grid.shape[4] == 3 else 1  # colour reconstructions are drawn in colour
    # one image: rows = dimensions, columns = offsets, 1-pixel gray gaps
    canvas = np.full((d * (h + 1) - 1, steps * (w + 1) - 1, channels), 0.5)
    for k in range(d):
        for t in range(steps):
            cell = grid[k, t, :, :, :channels]
            canvas[k * (h + 1) : k * (h + 1) + h, t * (w + 1) : t * (w + 1) + w] = cell
    fig = Figure(figsize=(0.5 * steps + 1.2, 0.5 * d + 1.0), layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.subplots()
    _show(ax, canvas)
    offsets = np.linspace(-value_range, value_range, steps)
    ax.set_xticks(
        [t * (w + 1) + (w - 1) / 2 for t in range(steps)], [f"{o:+.2f}" for o in offsets], fontsize=7
    )
    ax.set_yticks([k * (h + 1) + (h - 1) / 2 for k in range(d)], [str(k) for k in range(d)], fontsize=7)
    ax.set_xlabel("offset added to the dimension")
    ax.set_ylabel(f"dimension of capsule {name if name is not None else cls}")
    fig.suptitle(title, fontsize=9)
    _write(fig, path, fmt)
