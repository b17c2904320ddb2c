"""The `capsctl inspect --out` figure: the image, the class lengths, and per class and iteration
the coupling and agreement maps over the image. Matplotlib is used without pyplot (no global
state, no display): a Figure on an Agg canvas, saved to memory and written atomically."""

from __future__ import annotations

import functools
import io
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import numpy as np

from capsctl._io import atomic_write_bytes
from capsctl.errors import CapsctlError
from capsctl.inspect.analysis import Inspection, grid_extent, heat_maps
from capsctl.model.spec import ModelSpec, names_of

FORMATS = {".png": "png", ".svg": "svg", ".pdf": "pdf"}
MAX_ITERATIONS_SHOWN = 4  # with --routings 50, show 4 evenly spaced iterations, first and last included
MAX_CLASSES_SHOWN = 5  # the highest-scoring of the selected classes


_Draw = TypeVar("_Draw", bound=Callable[..., Any])


def plain_text(draw: _Draw) -> _Draw:
    """A figure function whose text is drawn as written: a `$` in a file or class name started matplotlib's
    mathtext (a traceback for 'a$_$.png', a mangled title for 'price $5 vs $6.png'). Text objects read
    the setting as they are made, so it holds while the whole figure is built."""

    @functools.wraps(draw)
    def plain(*args: Any, **kwargs: Any) -> Any:
        import matplotlib

        with matplotlib.rc_context({"text.parse_math": False}):
            return draw(*args, **kwargs)

    return plain  # type: ignore[return-value]


def check_out_path(path: Path, image: Path | None = None) -> str:
    """The figure format for `path`; refuses a bad suffix, a missing folder or the input `image` itself
    (it was overwritten by the figure) before any work."""
    fmt = FORMATS.get(path.suffix.lower())
    if fmt is None:
        raise CapsctlError(f"--out {path}: the figure must end in {', '.join(FORMATS)}")
    if image is not None:
        from capsctl._io import resolved

        if resolved(path, "--out") == resolved(image, "the image"):
            raise CapsctlError(f"--out {path}: is the input image; choose another path")
    parent = path.parent if str(path.parent) else Path(".")
    if not parent.is_dir():
        raise CapsctlError(f"--out {path}: folder {parent} does not exist")
    if path.is_dir():
        raise CapsctlError(f"--out {path}: is a folder")
    return fmt


def shown_iterations(routings: int) -> list[int]:
    if routings <= MAX_ITERATIONS_SHOWN:
        return list(range(routings))
    return sorted({round(x) for x in np.linspace(0, routings - 1, MAX_ITERATIONS_SHOWN)})


def shown_classes(res: Inspection) -> list[int]:
    """The classes whose maps are drawn: the selected ones, else the best one (highest first)."""
    chosen = res.selected or [int(np.argmax(res.scores))]
    return sorted(chosen, key=lambda j: -res.scores[j])[:MAX_CLASSES_SHOWN]


@plain_text
def save_figure(
    path: Path, image: np.ndarray, res: Inspection, spec: ModelSpec, title: str, dpi: int = 100
) -> None:
    """`image`: as the model sees it, gray (H, W) or RGB (H, W, 3) in 0..1; the input panel shows it
    as it is (in colour), the maps outline its gray mean."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fmt = check_out_path(path)
    gray = image if image.ndim == 2 else image.mean(axis=2)
    names = names_of(spec)
    h, w = gray.shape
    classes = shown_classes(res) if res.couplings is not None else []
    iters = shown_iterations(res.routings) if res.couplings is not None else []
    n_it = max(len(iters), 1)
    # Tall or square images: per class one row, couplings then agreements side by side. Wide
    # images: per class a row of couplings above a row of agreements, so panels stay legible.
    wide = w > 1.2 * h
    if wide:
        panel_w = min(2.6, 1.1 * w / h)
        panel_h = panel_w * h / w
        ncols, kind_rows = n_it, 2
    else:
        panel_w = 1.55
        panel_h = min(max(panel_w * h / w, 1.3), 3.2)
        ncols, kind_rows = 2 * n_it, 1
    class_h = kind_rows * (panel_h + 0.35) + 0.35
    fig_w = max(panel_w * ncols + 1.8, 7.0)
    fig_h = 2.9 + len(classes) * class_h
    fig = Figure(figsize=(fig_w, fig_h), dpi=dpi, layout="constrained")
    FigureCanvasAgg(fig)
    fig.suptitle(title, fontsize=11)
    rows = 1 + len(classes)
    top = fig.subfigures(rows, 1, height_ratios=[2.6] + [class_h] * len(classes), squeeze=False)[:, 0]

    _draw_overview(top[0], image, res, names)
    if res.couplings is None or res.agreement is None or res.grid is None:
        _write(fig, path, fmt)
        return
    extent = grid_extent(spec, res.grid)
    c_maps = heat_maps(res.couplings, res.grid)
    a_maps = heat_maps(res.agreement, res.grid)
    # one coupling scale for the whole figure so rows compare; min..max because routing often moves
    # the couplings only a little away from the uniform 1/J, which a 0..1 scale would hide
    shown = c_maps[iters][:, classes]
    cmin, cmax = float(shown.min()), float(shown.max())
    if cmax - cmin < 1e-6:
        cmin, cmax = cmin - 0.01, cmax + 0.01
    n_classes = len(res.scores)
    for row, j in enumerate(classes, start=1):
        sub = top[row]
        mark = "predicted" if j in res.predicted else "not above 0.5"
        sub.suptitle(
            f"class {names[j]} — length {res.scores[j]:.3f} ({mark})", fontsize=10, fontweight="bold"
        )
        axes = sub.subplots(kind_rows, ncols, squeeze=False)
        c_axes = list(axes[0, :n_it]) if not wide else list(axes[0])
        a_axes = list(axes[0, n_it:]) if not wide else list(axes[1])
        amax = float(np.abs(a_maps[iters, j]).max()) or 1.0
        c_im = a_im = None
        for k, r in enumerate(iters):
            c_im = _map(
                c_axes[k], c_maps[r, j], gray, extent, "viridis", cmin, cmax, f"coupling c, iter {r + 1}"
            )
            a_im = _map(
                a_axes[k], a_maps[r, j], gray, extent, "RdBu_r", -amax, amax, f"agreement û·v, iter {r + 1}"
            )
        bar = sub.colorbar(c_im, ax=c_axes, shrink=0.9, label=f"c (line: 1/{n_classes})")
        if cmin <= 1.0 / n_classes <= cmax:
            bar.ax.axhline(1.0 / n_classes, color="white", linewidth=1.5)  # the uniform coupling
        sub.colorbar(a_im, ax=a_axes, shrink=0.9, label="û·v")
    _write(fig, path, fmt)


def _draw_overview(sub, image: np.ndarray, res: Inspection, names: tuple[str, ...]) -> None:
    from matplotlib import patheffects

    ax_img, ax_bar = sub.subplots(1, 2, width_ratios=[1, 2.2])
    h, w = image.shape[:2]
    if image.ndim == 3:  # RGB: drawn as it is (imshow ignores cmap for 3 channels); clipped for safety
        ax_img.imshow(np.clip(image, 0.0, 1.0), interpolation="nearest")
    else:
        ax_img.imshow(image, cmap="gray", vmin=0, vmax=1, interpolation="nearest")
    ax_img.set_title(f"input {h}×{w}\n(as the model sees it)", fontsize=9)
    ax_img.set_xticks([])
    ax_img.set_yticks([])
    if res.order and res.centres is not None:
        for rank, j in enumerate(res.order, start=1):
            r, q = res.centres[j]
            if np.isnan(r):
                continue
            ax_img.plot(q, r, "+", color="orange", markersize=12, markeredgewidth=2)
            # staggered so classes placed close together (often spurious ones) stay readable
            ax_img.annotate(
                f"{rank}: {names[j]}",
                (q, r),
                xytext=(5, 6 - 12 * ((rank - 1) % 3)),
                textcoords="offset points",
                color="orange",
                fontsize=10,
                fontweight="bold",
                path_effects=[patheffects.withStroke(linewidth=2.5, foreground="black")],
            )
    j_all = np.arange(len(res.scores))
    colours = ["tab:green" if j in res.predicted else "tab:gray" for j in j_all]
    ax_bar.bar(j_all, res.scores, color=colours)
    ax_bar.axhline(0.5, color="black", linewidth=0.8, linestyle="--")
    ax_bar.set_ylim(0, 1.05)
    # digit names fit under their bars; longer names (cifar10's 'automobile') are turned
    if max(len(n) for n in names) > 2:
        ax_bar.set_xticks(j_all, names, rotation=45, ha="right", fontsize=8)
    else:
        ax_bar.set_xticks(j_all, names)
    ax_bar.set_xlabel("class")
    kind = "capsule length ‖v_j‖" if res.couplings is not None else "class score (pooling head)"
    ax_bar.set_ylabel(kind)
    order = (
        f" — reading order ({res.direction}): {', '.join(names[j] for j in res.order)}" if res.order else ""
    )
    ax_bar.set_title(
        f"predicted (> 0.5, green): {', '.join(names[j] for j in res.predicted) or 'none'}{order}", fontsize=9
    )


def _map(ax, values, image, extent, cmap, vmin, vmax, title):
    h, w = image.shape
    ax.set_facecolor("0.25")  # the image margin the trunk's grid does not cover
    im = ax.imshow(values, cmap=cmap, vmin=vmin, vmax=vmax, extent=extent, interpolation="nearest")
    if float(image.max()) > float(image.min()):  # the digit's outline, so the map reads against the image
        # visible on the dark and on the light (diverging) maps
        outline = "white" if cmap == "viridis" else "0.35"
        ax.contour(
            image,
            levels=[0.5],
            colors=outline,
            linewidths=0.7,
            extent=(-0.5, w - 0.5, h - 0.5, -0.5),
            origin="upper",
        )
    ax.set_xlim(-0.5, w - 0.5)
    ax.set_ylim(h - 0.5, -0.5)
    ax.set_xticks([])
    ax.set_yticks([])
    ax.set_title(title, fontsize=8)
    return im


def _write(fig, path: Path, fmt: str) -> None:
    buf = io.BytesIO()
    fig.savefig(buf, format=fmt)
    atomic_write_bytes(path, buf.getvalue())
