"""What the routing did for one image: predictions, convergence, heat maps and reading order.

Backend-neutral (numpy only). Input: class scores (J,) and the routing trace of one image,
couplings c and agreements û_j|i·v_j of shape (R, J, N) with N = grid height × width (row-major,
the capsule head's input order), plus the model spec for the grid's geometry in image pixels.

Reading order: each selected class's "mass" over the inputs is its evidence map at the last
iteration, and the classes are sorted by the centre of mass of that map — by row (top to bottom)
for an image taller than wide, else by column (left to right). The default map ('contribution')
is max(c_ij · û_j|i·v_j, 0): how much input i pushed class j's output along its final direction.
'coupling' uses the couplings above their mean over the inputs; 'raw' the couplings as they are.
tools/inspect_order.py measures the three on composites.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from capsctl.choices import DIRECTIONS, WEIGHTINGS
from capsctl.errors import CapsctlError
from capsctl.model.spec import ConvLayer, ModelSpec

THRESHOLD = 0.5


# -- per-iteration statistics ---------------------------------------------------------------


def coupling_deltas(c: np.ndarray) -> list[float | None]:
    """Mean |c_r − c_{r−1}| over classes and inputs for each iteration r of c (R, J, N).

    The first iteration has no predecessor (its couplings are the uniform softmax of b = 0): None.
    """
    c = np.asarray(c, np.float64)
    return [None] + [float(np.abs(c[r] - c[r - 1]).mean()) for r in range(1, len(c))]


def coupling_entropy(c: np.ndarray) -> list[float]:
    """Mean over inputs of the entropy (nats) of each input's couplings over the classes.

    ln J when an input spreads evenly over the J classes, 0 when it routes to one class.
    """
    c = np.clip(np.asarray(c, np.float64), 1e-30, 1.0)
    return [float(x) for x in (-(c * np.log(c)).sum(axis=1)).mean(axis=1)]


# -- geometry ------------------------------------------------------------------------------


def grid_geometry(spec: ModelSpec) -> tuple[float, float]:
    """(offset, stride) so that grid index g is centred on image pixel offset + g·stride."""
    offset, stride = 0.0, 1.0
    for layer in spec.trunk:
        if isinstance(layer, ConvLayer):
            if layer.padding == "valid":  # the output sits at the kernel's centre ('same' keeps it)
                offset += (layer.kernel - 1) / 2 * stride
            stride *= layer.stride
        else:
            offset += (layer.size - 1) / 2 * stride
            stride *= layer.size
    primary = spec.capsule.primary if spec.head == "capsule" else None
    if primary is not None:  # the routing's grid is the primary capsules' ('valid')
        offset += (primary.kernel - 1) / 2 * stride
        stride *= primary.stride
    return offset, stride


def grid_extent(spec: ModelSpec, grid: tuple[int, int]) -> tuple[float, float, float, float]:
    """Matplotlib extent (left, right, bottom, top) placing a grid map over the image's pixels."""
    offset, stride = grid_geometry(spec)
    gh, gw = grid
    half = stride / 2
    return (
        offset - half,
        offset + (gw - 1) * stride + half,
        offset + (gh - 1) * stride + half,
        offset - half,
    )


def heat_maps(x: np.ndarray, grid: tuple[int, int]) -> np.ndarray:
    """(R, J, N) -> (R, J, gh, gw): inputs are row-major over the trunk's grid."""
    x = np.asarray(x)
    gh, gw = grid
    if x.shape[-1] != gh * gw:
        raise CapsctlError(f"trace has {x.shape[-1]} inputs, the grid {gh}x{gw} has {gh * gw}")
    return x.reshape(*x.shape[:-1], gh, gw)


def evidence(couplings: np.ndarray, agreement: np.ndarray, weighting: str = "contribution") -> np.ndarray:
    """Last-iteration map (J, N) whose centre of mass places each class (see module doc)."""
    c, a = np.asarray(couplings[-1], np.float64), np.asarray(agreement[-1], np.float64)
    if weighting == "contribution":
        return np.maximum(c * a, 0.0)
    if weighting == "coupling":
        return np.maximum(c - c.mean(axis=1, keepdims=True), 0.0)
    if weighting == "raw":
        return c
    raise CapsctlError(f"weighting must be one of {', '.join(WEIGHTINGS)}, got {weighting!r}")


def centres_of_mass(weights: np.ndarray, grid: tuple[int, int], spec: ModelSpec) -> np.ndarray:
    """(J, N) non-negative maps -> (J, 2) centres (row, col) in image pixels; NaN for an all-zero map."""
    offset, stride = grid_geometry(spec)
    gh, gw = grid
    w = heat_maps(np.asarray(weights, np.float64), grid)  # (J, gh, gw)
    total = w.sum(axis=(1, 2))
    rows = offset + stride * np.arange(gh)
    cols = offset + stride * np.arange(gw)
    with np.errstate(invalid="ignore", divide="ignore"):
        r = (w.sum(axis=2) * rows).sum(axis=1) / total
        q = (w.sum(axis=1) * cols).sum(axis=1) / total
    out = np.stack([r, q], axis=1)
    out[total <= 0] = np.nan
    return out


def resolve_direction(direction: str, image_shape: tuple[int, int]) -> str:
    if direction not in DIRECTIONS:
        raise CapsctlError(f"--order must be one of {', '.join(DIRECTIONS)}, got {direction!r}")
    if direction != "auto":
        return direction
    h, w = image_shape
    return "top-to-bottom" if h > w else "left-to-right"


def reading_order(classes: list[int], centres: np.ndarray, direction: str) -> list[int]:
    """`classes` sorted by their centre's row (top-to-bottom) or column (left-to-right).

    Ties and classes without a centre keep their given order (a stable sort, NaN last).
    """
    axis = 0 if direction == "top-to-bottom" else 1
    keys = [centres[j, axis] for j in classes]
    ranked = sorted(
        range(len(classes)), key=lambda i: (np.isnan(keys[i]), 0.0 if np.isnan(keys[i]) else keys[i], i)
    )
    return [classes[i] for i in ranked]


# -- one image -------------------------------------------------------------------------------


def predicted_classes(scores: np.ndarray, threshold: float = THRESHOLD) -> list[int]:
    """Classes scoring above `threshold`, highest first."""
    order = np.argsort(-np.asarray(scores), kind="stable")
    return [int(j) for j in order if scores[j] > threshold]


def top_classes(scores: np.ndarray, k: int) -> list[int]:
    return [int(j) for j in np.argsort(-np.asarray(scores), kind="stable")[:k]]


@dataclass
class Inspection:
    """Everything `capsctl inspect` shows for one image."""

    scores: np.ndarray  # (J,) capsule lengths (or pooling-head sigmoid scores)
    image_shape: tuple[int, int]
    predicted: list[int]  # above 0.5, highest first
    top: list[int]  # the top k (empty without --top)
    selected: list[int]  # the classes whose order is read: top k if asked, else predicted
    couplings: np.ndarray | None = None  # (R, J, N); None for the pooling head
    agreement: np.ndarray | None = None
    grid: tuple[int, int] | None = None
    deltas: list[float | None] = field(default_factory=list)
    entropy: list[float] = field(default_factory=list)
    centres: np.ndarray | None = None  # (J, 2) image pixels (row, col)
    direction: str | None = None
    order: list[int] | None = None
    weighting: str = "contribution"

    @property
    def routings(self) -> int:
        return 0 if self.couplings is None else int(self.couplings.shape[0])

    def to_json(self, names: Sequence[str] | None = None) -> dict[str, Any]:
        """A JSON-able dict: plain lists and floats, couplings as [iterations][classes][inputs].

        Classes are indices (as before) with their names beside them: `class_names[j]` names
        `lengths[j]`, and `predicted_names`, `top_names`, `order_names` spell out those lists.
        `names`: the model's class names (names_of(spec)); "0".."J-1" when not given."""
        names = [str(j) for j in range(len(self.scores))] if names is None else list(names)
        if len(names) != len(self.scores):
            raise CapsctlError(f"{len(names)} class names for {len(self.scores)} class scores")
        d: dict[str, Any] = {
            "image_shape": list(self.image_shape),
            "class_names": names,
            "lengths": [float(x) for x in self.scores],
            "threshold": THRESHOLD,
            "predicted": self.predicted,
            "predicted_names": [names[j] for j in self.predicted],
            "top": self.top,
            "top_names": [names[j] for j in self.top],
            "order": self.order,
            "order_names": None if self.order is None else [names[j] for j in self.order],
            "direction": self.direction,
            "grid": list(self.grid) if self.grid else None,
            "routings": self.routings,
            "weighting": self.weighting if self.couplings is not None else None,
            "iterations": [
                {"iteration": r + 1, "mean_abs_delta": dlt, "mean_entropy": ent}
                for r, (dlt, ent) in enumerate(zip(self.deltas, self.entropy, strict=True))
            ],
            "centres": None,
            "couplings": None,
            "agreement": None,
        }
        if self.centres is not None:
            d["centres"] = {
                str(j): (None if np.isnan(self.centres[j]).any() else [float(x) for x in self.centres[j]])
                for j in self.selected
            }
        if self.couplings is not None and self.agreement is not None:
            d["couplings"] = np.asarray(self.couplings, np.float64).tolist()
            d["agreement"] = np.asarray(self.agreement, np.float64).tolist()
        return d


def inspect_one(
    spec: ModelSpec,
    scores: np.ndarray,
    image_shape: tuple[int, int],
    couplings: np.ndarray | None = None,
    agreement: np.ndarray | None = None,
    *,
    top: int | None = None,
    direction: str = "auto",
    weighting: str = "contribution",
) -> Inspection:
    """Analyse one image's scores (J,) and, for the capsule head, its trace (R, J, N) each."""
    scores = np.asarray(scores, np.float64)
    predicted = predicted_classes(scores)
    tops = top_classes(scores, top) if top else []
    selected = tops if top else predicted
    result = Inspection(scores, tuple(image_shape), predicted, tops, selected, weighting=weighting)  # type: ignore[arg-type]
    if couplings is None or agreement is None:
        return result
    gh, gw, types = spec.capsule_grid(*image_shape)
    grid = (gh, gw)
    couplings, agreement = np.asarray(couplings), np.asarray(agreement)
    each = couplings  # every input capsule's couplings: the statistics (a place's mean over types is not one)
    place_evidence = None
    if types > 1 and couplings.ndim == 3 and couplings.shape == agreement.shape:
        # primary capsules: TYPES input capsules at each place (row-major over row, column, type). The
        # evidence is summed over a place's types; the maps show its mean over them (couplings still sum
        # to 1 over the classes)
        r, j = couplings.shape[:2]
        per_capsule = evidence(couplings, agreement, weighting)  # (J, N·TYPES)
        place_evidence = per_capsule.reshape(j, gh * gw, types).sum(axis=2)
        couplings = couplings.reshape(r, j, gh * gw, types).mean(axis=3)
        agreement = agreement.reshape(r, j, gh * gw, types).mean(axis=3)
    if couplings.shape != agreement.shape or couplings.ndim != 3 or couplings.shape[1] != len(scores):
        raise CapsctlError(
            f"trace shapes {couplings.shape} / {agreement.shape} do not fit {len(scores)} classes"
        )
    heat_maps(couplings, grid)  # checks N against the grid
    result.couplings, result.agreement, result.grid = couplings, agreement, grid
    result.deltas = coupling_deltas(each)
    result.entropy = coupling_entropy(each)
    if place_evidence is None:
        place_evidence = evidence(couplings, agreement, weighting)
    result.centres = centres_of_mass(place_evidence, grid, spec)
    result.direction = resolve_direction(direction, image_shape)
    result.order = reading_order(selected, result.centres, result.direction)
    return result
