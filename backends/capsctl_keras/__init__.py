"""The Keras 3 (TensorFlow) backend. Importing this package imports neither keras nor tensorflow;
the methods do (through ._env, which pins KERAS_BACKEND first)."""

from __future__ import annotations

import importlib.util
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import numpy as np

from capsctl.backend import Backend, BenchKernels, OptimConfig, Runner, Trainer
from capsctl.model.spec import ModelSpec

if TYPE_CHECKING:
    from capsctl.training.distributed import Engine


def _defaults() -> None:
    """Every capsctl use of Keras runs in float32, channels-last (_env.use_capsctl_defaults)."""
    from ._env import use_capsctl_defaults

    use_capsctl_defaults()


class KerasBackend:
    name = "keras"
    export_formats: tuple[str, ...] = ("keras",)

    def is_available(self) -> bool:
        return all(importlib.util.find_spec(m) is not None for m in ("keras", "tensorflow"))

    def describe(self) -> str:
        from ._env import describe

        return describe()

    def runner(self, spec: ModelSpec, weights: Mapping[str, np.ndarray]) -> Runner:
        from ._runner import KerasRunner

        _defaults()
        return KerasRunner(spec, weights)

    def trainer(self, spec: ModelSpec, weights: Mapping[str, np.ndarray], optim: OptimConfig) -> Trainer:
        from ._trainer import KerasTrainer

        _defaults()
        return KerasTrainer(spec, weights, optim)

    def export_bytes(self, spec: ModelSpec, weights: Mapping[str, np.ndarray], format: str) -> bytes:
        from ._native import export_bytes

        _defaults()
        return export_bytes(spec, weights, format)

    def import_native(self, path: str) -> tuple[ModelSpec, dict[str, np.ndarray]]:
        from ._native import import_native

        _defaults()
        return import_native(path)

    def bench_kernels(self) -> BenchKernels:
        from . import _bench

        _defaults()
        return _bench

    def distributed(self) -> Engine:
        from . import _distributed

        _defaults()
        return _distributed


if TYPE_CHECKING:  # mypy holds the class to the protocol; nothing runs
    from . import _distributed

    _engine: Engine = _distributed  # the module is the engine
    _: type[Backend] = KerasBackend


def load_model(path: str) -> Any:
    """Open a `capsctl export --format keras` file as a plain Keras model (safe_mode, no custom code
    beyond this package's registered layers): `capsctl_keras.load_model("m.keras").predict(x)` gives
    the scores, or [scores, reconstruction from the top capsule] for a model with a decoder."""
    from capsctl.errors import CapsctlError

    from ._env import keras
    from ._layers import CapsNet  # registers capsctl>CapsNet, CapsuleHead and CapsuleDecoder

    model = keras.saving.load_model(path, compile=False, safe_mode=True)
    if not isinstance(model, CapsNet):
        raise CapsctlError(f"{path}: not a capsctl model (a {type(model).__name__})")
    return model
