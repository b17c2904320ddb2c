"""Canonical (channels-last) weights <-> this framework's variables: a name -> permutation table.

Keras kernels are already channels-last ([kh, kw, in, out] convs, [in, out] dense), so every
permutation is the identity; the table only maps names to Keras variable paths
(`<layer name>/<variable name>`, layer names fixed in _layers).
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from capsctl.model import layout
from capsctl.model.layout import LayoutTable
from capsctl.model.spec import ModelSpec
from capsctl.model.weights import trained

_BATCHNORM = {"gamma": "gamma", "beta": "beta", "mean": "moving_mean", "var": "moving_variance"}


def table(spec: ModelSpec, trained_only: bool = False) -> LayoutTable:
    """Every canonical tensor's Keras variable path; `trained_only`: without the running statistics
    (the optimiser's slots)."""
    rows: LayoutTable = {}
    for k, conv in enumerate(spec.conv_layers):
        rows[f"trunk.{k}.kernel"] = (f"trunk_conv{k}/kernel", None)
        rows[f"trunk.{k}.bias"] = (f"trunk_conv{k}/bias", None)
        if conv.batchnorm:
            for stat, native in _BATCHNORM.items():
                rows[f"trunk.{k}.bn.{stat}"] = (f"trunk_bn{k}/{native}", None)
    if spec.head == "capsule":
        if spec.capsule.primary is not None:
            rows["head.primary.kernel"] = ("head_capsule/primary_kernel", None)
            rows["head.primary.bias"] = ("head_capsule/primary_bias", None)
        rows["head.capsule.kernel"] = ("head_capsule/kernel", None)
        if spec.capsule.routing == "attention":
            rows["head.capsule.bias"] = ("head_capsule/bias", None)
    else:
        for i in range(2):
            rows[f"head.dense{i}.kernel"] = (f"head_dense{i}/kernel", None)
            rows[f"head.dense{i}.bias"] = (f"head_dense{i}/bias", None)
    if spec.decoder is not None:
        for k in range(len(spec.decoder.hidden) + 1):
            rows[f"decoder.dense{k}.kernel"] = (f"decoder/decoder_dense{k}/kernel", None)
            rows[f"decoder.dense{k}.bias"] = (f"decoder/decoder_dense{k}/bias", None)
    if trained_only:
        rows = {name: row for name, row in rows.items() if trained(name)}
    return rows


def to_native(spec: ModelSpec, weights: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    return layout.to_native(table(spec), weights)


def to_canonical(spec: ModelSpec, native: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    return layout.to_canonical(table(spec), native)


def variables(model: object) -> dict[str, object]:
    """The model's variables by path; the table's native names index into this."""
    return {v.path: v for v in model.weights}  # type: ignore[attr-defined]


def assign(spec: ModelSpec, model: object, weights: Mapping[str, np.ndarray]) -> None:
    """Load canonical weights into a built model; every table row must find its variable."""
    by_path = variables(model)
    for native, arr in to_native(spec, weights).items():
        by_path[native].assign(arr)  # type: ignore[attr-defined]


def read(spec: ModelSpec, model: object) -> dict[str, np.ndarray]:
    by_path = variables(model)
    return to_canonical(spec, {p: np.asarray(v.numpy()) for p, v in by_path.items()})  # type: ignore[attr-defined]
