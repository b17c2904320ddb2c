"""The PyTorch backend. Importing this package does not import torch; the methods do."""

from __future__ import annotations

import importlib.util
import os
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import numpy as np

# Before torch (and its OpenMP runtime) is loaded by any submodule: OpenMP workers that sleep
# instead of spinning at every barrier. Spinning wins on an idle machine by a few percent at
# best; on a CPU shared with other processes a spinning worker steals the core its partner
# needs, and a training step measured 3-5x slower (docs/PERFORMANCE.md). A user's own setting wins.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from capsctl.backend import Backend, BenchKernels, OptimConfig, Runner, Trainer
from capsctl.model.spec import ModelSpec

if TYPE_CHECKING:
    from capsctl.training.distributed import Engine


class TorchBackend:
    name = "torch"
    export_formats: tuple[str, ...] = ("torch", "onnx")

    def is_available(self) -> bool:
        return importlib.util.find_spec("torch") is not None

    def describe(self) -> str:
        from ._env import describe

        return describe()

    def runner(self, spec: ModelSpec, weights: Mapping[str, np.ndarray]) -> Runner:
        from ._runner import TorchRunner

        return TorchRunner(spec, weights)

    def trainer(self, spec: ModelSpec, weights: Mapping[str, np.ndarray], optim: OptimConfig) -> Trainer:
        from ._trainer import TorchTrainer

        return TorchTrainer(spec, weights, optim)

    def export_bytes(self, spec: ModelSpec, weights: Mapping[str, np.ndarray], format: str) -> bytes:
        from ._native import export_bytes

        return export_bytes(spec, weights, format)

    def import_native(self, path: str) -> tuple[ModelSpec, dict[str, np.ndarray]]:
        from ._native import import_native

        return import_native(path)

    def bench_kernels(self) -> BenchKernels:
        from . import _bench

        return _bench

    def distributed(self) -> Engine:
        from . import _distributed

        return _distributed


def load_model(path: str) -> Any:
    """Open a `capsctl export --format torch` file as a plain torch module (torch.load with
    weights_only=True: no code is unpickled; the spec it carries rebuilds the network), in eval mode on
    the CPU: `capsctl_torch.load_model("m.pt")(x)`, x float32 images (B, C, H, W) in [0, 1], gives the
    scores (B, J); `.capsules(x)` the output capsules (B, J, D) of a capsule head."""
    from ._native import import_native
    from ._runner import build

    return build(*import_native(path)).cpu().eval()


if TYPE_CHECKING:  # mypy holds the class to the protocol; nothing runs
    from . import _distributed

    _engine: Engine = _distributed  # the module is the engine
    _: type[Backend] = TorchBackend
