"""Small PNG plots of experiment results (matplotlib, Agg, imported only here)."""

from __future__ import annotations

import io
from collections.abc import Callable
from math import nan
from pathlib import Path
from typing import Any

from capsctl._io import atomic_write_bytes
from capsctl.experiment.tables import paired, test_title

DPI = 72  # small files: these go into the repository's docs


def _figure(w: float, h: float) -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt, plt.subplots(1, 2, figsize=(w, h), dpi=DPI)


def _save(plt: Any, fig: Any, path: Path) -> Path:
    buf = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buf, format="png", dpi=DPI, metadata={"Software": None})
    plt.close(fig)
    atomic_write_bytes(path, buf.getvalue())
    return path


def pairs_plots(r: dict[str, Any], out: Path) -> list[Path]:
    return [curves_plot(r, out / "curves.png"), accuracy_plot(r, out / "accuracy.png")]


def curves_plot(r: dict[str, Any], path: Path) -> Path:
    """Training loss and per-epoch test accuracy (first N test images), one line per model."""
    plt, (fig, (ax_loss, ax_acc)) = _figure(8, 3)
    colors = {"capsule": "tab:blue", "pool": "tab:orange", "capsule+decoder": "tab:green"}
    for m in r["models"]:
        ep = [c["epoch"] for c in m["curve"]]
        label = f"{m['head']} s{m['seed']}"
        ax_loss.plot(
            ep,
            [c["loss"] for c in m["curve"]],
            color=colors.get(m["head"]),
            alpha=0.7,
            label=label,
            marker=".",
        )
        acc = [c["test_accuracy"] for c in m["curve"]]
        if all(a is not None for a in acc):
            ax_acc.plot(
                ep, [100 * a for a in acc], color=colors.get(m["head"]), alpha=0.7, label=label, marker="."
            )
    ax_loss.set(xlabel="epoch", ylabel="margin loss", yscale="log", title="training loss")
    ax_acc.set(
        xlabel="epoch",
        ylabel="%",
        title=f"{'held-out' if r.get('holdout') else 'test'} accuracy "
        f"(first {r.get('curve_test_images', '')} images)",
    )
    lo = min(
        [
            100 * c["test_accuracy"]
            for m in r["models"]
            for c in m["curve"][len(m["curve"]) // 2 :]
            if c["test_accuracy"] is not None
        ]
        or [0]
    )
    ax_acc.set_ylim(max(0, lo - 2), 100)
    ax_acc.legend(fontsize=7, ncol=2)
    return _save(plt, fig, path)


def accuracy_plot(r: dict[str, Any], path: Path) -> Path:
    """Bars: accuracy and confident accuracy per test per head (mean over seeds, ± std)."""
    plt, (fig, axes) = _figure(9, 3)
    tests = r["tests"]
    heads = list(r["summary"])
    width = 0.8 / max(len(heads), 1)
    for ax, key, title in zip(
        axes,
        ("accuracy", "confident_accuracy"),
        ("accuracy", "confident accuracy (k-th score > 0.5)"),
        strict=True,
    ):
        for i, head in enumerate(heads):
            vals = [r["summary"][head]["tests"][t][key] for t in tests]
            xs = [j + (i - (len(heads) - 1) / 2) * width for j in range(len(tests))]
            bars = ax.bar(
                xs,
                [100 * m for m, _ in vals],
                width,
                yerr=[100 * (s or 0.0) for _, s in vals],
                label=head,
                capsize=2,
            )
            ax.bar_label(bars, fmt="%.1f", fontsize=6, padding=1)
        ax.set_xticks(range(len(tests)), [test_title(r, t).replace(" ", "\n", 1) for t in tests], fontsize=7)
        ax.set(ylim=(0, 100), ylabel="%", title=title)
        ax.grid(axis="y", alpha=0.3)
    axes[0].legend(fontsize=8)
    return _save(plt, fig, path)


def ablate_measure(r: dict[str, Any]) -> tuple[str, Callable[[dict[str, Any]], float]]:
    """What the ablation plot shows: paired accuracy (the mean over the pair layouts scored) or, where no
    pair layout was scored (a preset that sees its training size only), the first test's accuracy."""
    if any(t in r["tests"] for t in ("vertical", "horizontal")):
        return "paired accuracy %", paired
    first = r["tests"][0]
    title = f"{test_title(r, first)} accuracy %"
    return title, lambda tests: tests[first]["accuracy"] if first in tests else nan


def ablate_plots(r: dict[str, Any], out: Path) -> list[Path]:
    """Paired accuracy (see `ablate_measure`) against routing iterations: trained at R, and trained at 3
    scored at R."""
    plt, (fig, (ax_t, ax_e)) = _figure(9, 3.2)
    ylabel, measure = ablate_measure(r)
    for v in r["variants"]:
        label = f"{v['routing']} / squash {v['squash']}"
        tr = sorted((e["routings"], measure(e["tests"])) for e in v["trained"])
        ev = sorted((e["routings"], measure(e["tests"])) for e in v["evaluated"])
        line = ax_t.plot([a for a, _ in tr], [100 * b for _, b in tr], marker="o", label=label)[0]
        ax_e.plot(
            [a for a, _ in ev], [100 * b for _, b in ev], marker="o", color=line.get_color(), label=label
        )
    ax_t.set(
        xlabel="routing iterations (trained and scored)", ylabel=ylabel, title="trained at R"
    )
    ax_e.set(xlabel="routing iterations (scored)", title=f"trained at {r['base_iterations']}, scored at R")
    for ax in (ax_t, ax_e):
        ax.grid(alpha=0.3)
    ax_e.legend(fontsize=7)
    return [_save(plt, fig, out / "ablation.png")]
