"""Converting canonical weights to and from a framework's own names and axis orders.

A backend describes its layout as a table (timm style): canonical name -> (native name,
permutation taking the native array to the canonical one, or None for the identity). These two
functions are the only code that applies such a table, for every backend.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

LayoutTable = dict[str, tuple[str, tuple[int, ...] | None]]


def to_native(table: LayoutTable, weights: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Canonical arrays keyed by native names, transposed into the native axis order."""
    out = {}
    for name, (native, perm) in table.items():
        arr = weights[name]
        # a copy, never a view: a framework may wrap it (torch.from_numpy) and update it in place
        out[native] = np.array(arr.transpose(np.argsort(perm)) if perm else arr, order="C", copy=True)
    return out


def to_canonical(table: LayoutTable, native: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Native arrays back to canonical names and channels-last axis order, as float32."""
    out = {}
    for name, (key, perm) in table.items():
        arr = native[key]
        # a copy, never a view of a live framework tensor that the next step changes in place
        out[name] = np.array(arr.transpose(perm) if perm else arr, dtype=np.float32, order="C", copy=True)
    return out
