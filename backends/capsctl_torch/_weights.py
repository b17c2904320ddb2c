"""Canonical (channels-last) weights <-> this framework's parameters: a name -> permutation table."""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from capsctl.model import layout
from capsctl.model.layout import LayoutTable
from capsctl.model.spec import ModelSpec
from capsctl.model.weights import trained

# canonical name pattern -> (native name pattern, permutation taking the native array to canonical)
_CONV_KERNEL = (2, 3, 1, 0)  # torch [out, in, kh, kw] -> [kh, kw, in, out]
_DENSE_KERNEL = (1, 0)  # torch Linear [out, in] -> [in, out]


_DEPTHWISE_KERNEL = (2, 3, 0, 1)  # torch grouped conv [C, 1, kh, kw] -> [kh, kw, C, 1]
_BATCHNORM = {"gamma": "weight", "beta": "bias", "mean": "running_mean", "var": "running_var"}


def table(spec: ModelSpec, trained_only: bool = False) -> LayoutTable:
    """Every canonical tensor's native name and permutation; `trained_only`: without the running
    statistics (the optimiser's slots)."""
    rows: LayoutTable = {}
    for k, conv in enumerate(spec.conv_layers):
        rows[f"trunk.{k}.kernel"] = (f"trunk.convs.{k}.weight", _CONV_KERNEL)
        rows[f"trunk.{k}.bias"] = (f"trunk.convs.{k}.bias", None)
        if conv.batchnorm:
            for stat, native in _BATCHNORM.items():
                rows[f"trunk.{k}.bn.{stat}"] = (f"trunk.bns.{k}.{native}", None)
    if spec.head == "capsule":
        primary = spec.capsule.primary
        if primary is not None:
            perm = _DEPTHWISE_KERNEL if primary.kind == "depthwise" else _CONV_KERNEL
            rows["head.primary.kernel"] = ("head.primary.weight", perm)
            rows["head.primary.bias"] = ("head.primary.bias", None)
        rows["head.capsule.kernel"] = ("head.kernel", None)
        if spec.capsule.routing == "attention":
            rows["head.capsule.bias"] = ("head.bias", None)
    else:
        rows["head.dense0.kernel"] = ("head.dense0.weight", _DENSE_KERNEL)
        rows["head.dense0.bias"] = ("head.dense0.bias", None)
        rows["head.dense1.kernel"] = ("head.dense1.weight", _DENSE_KERNEL)
        rows["head.dense1.bias"] = ("head.dense1.bias", None)
    if spec.decoder is not None:
        for k in range(len(spec.decoder.hidden) + 1):
            rows[f"decoder.dense{k}.kernel"] = (f"decoder.layers.{k}.weight", _DENSE_KERNEL)
            rows[f"decoder.dense{k}.bias"] = (f"decoder.layers.{k}.bias", None)
    if trained_only:
        rows = {name: row for name, row in rows.items() if trained(name)}
    return rows


def to_native(spec: ModelSpec, weights: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    return layout.to_native(table(spec), weights)


def to_canonical(spec: ModelSpec, native: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    return layout.to_canonical(table(spec), native)
