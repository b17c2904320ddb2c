"""The backend protocol and registry.

A backend is a small class (einops style) that imports its framework only inside its methods.
Backends register under the entry-point group `capsctl.backends`; the two shipped ones are also
known by module path, so a source checkout works without installation.
"""

from __future__ import annotations

import importlib
import importlib.util
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from importlib.metadata import entry_points
from typing import TYPE_CHECKING, Protocol

import numpy as np

from capsctl.errors import CapsctlError
from capsctl.model.reference import RoutingTrace
from capsctl.model.spec import ModelSpec

if TYPE_CHECKING:
    from capsctl.training.distributed import Engine

Weights = dict[str, np.ndarray]

BUILTIN = {"torch": "capsctl_torch:TorchBackend", "keras": "capsctl_keras:KerasBackend"}
EXTRAS = {"torch": "capsctl[torch]", "keras": "capsctl[keras]"}


@dataclass(frozen=True)
class OptimConfig:
    weight_decay: float = 0.0  # decoupled (AdamW) decay; 0 = plain Adam
    beta1: float = 0.9
    beta2: float = 0.999
    eps: float = 1e-7  # Keras' default; used by both backends so they train alike
    # weight of the decoder's reconstruction loss (spec.decoder set); None: default_recon_weight(spec)
    recon_weight: float | None = None


@dataclass(frozen=True)
class DigitTargets:
    """What a decoder redraws from an image of several digits: each digit alone, at its place."""

    images: np.ndarray  # float32 (B, k, H, W, C): digit k of each image with nothing else on its canvas
    onehots: np.ndarray  # float32 (B, k, J): digit k's class, one-hot (the capsule it is drawn from)


class Runner(Protocol):
    """A model ready for inference."""

    def scores(self, images: np.ndarray, batch_size: int = 512) -> np.ndarray:
        """Class scores (N, J) for float32 images (N, H, W, C)."""

    def trace(self, images: np.ndarray, routings: int | None = None) -> tuple[np.ndarray, RoutingTrace]:
        """Scores and routing trace (capsule head only)."""

    def capsules(self, images: np.ndarray) -> np.ndarray:
        """Output capsules v (N, J, D) (capsule head only)."""

    def decode(self, masked: np.ndarray) -> np.ndarray:
        """The decoder (spec.decoder set) on capsules (N, J, D), already masked -> images (N, H, W, C)."""

    def reconstruct(self, images: np.ndarray, classes: np.ndarray) -> np.ndarray:
        """Reconstructions (N, H, W, C) from the capsule classes[n] alone (every other one zeroed)."""


class Trainer(Protocol):
    def step(
        self, x: np.ndarray, y_onehot: np.ndarray, lr: float, digits: DigitTargets | None = None
    ) -> tuple[float, int]:
        """One optimiser step; returns (mean loss, correct predictions in the batch).

        The loss is the margin loss, plus recon_weight × Σ_pixels (reconstruction − x)² (mean over
        the batch) when the spec has a decoder, the reconstruction drawn from the true class's capsule.
        With `digits` (images holding several digits, `capsctl train --compose`), each digit k is drawn
        from its own class's capsule alone against that digit alone: recon_weight × Σ_k Σ_pixels
        (reconstruction_k − digits.images[:, k])², mean over the batch."""

    def scores(self, images: np.ndarray, batch_size: int = 512) -> np.ndarray: ...

    def weights(self) -> Weights:
        """Current weights in the canonical layout."""

    def optimizer_state(self) -> Weights:
        """Optimiser slots keyed `m.<name>`, `v.<name>` (canonical layout) and `step`."""

    def load_optimizer_state(self, state: Mapping[str, np.ndarray]) -> None: ...


class BenchKernels(Protocol):
    """Framework kernels `capsctl bench` times beside training: what the protocol has no other word for."""

    def threads(self) -> dict[str, int]:
        """The framework's thread pools (intra-op, inter-op)."""

    def sgemm(self, n: int) -> Callable[[], None]:
        """A function doing one float32 n×n×n matmul per call: the machine's rate."""

    def routing_fns(
        self, spec: ModelSpec, kernel: np.ndarray, batch: int, size: tuple[int, int] = (28, 28)
    ) -> dict[str, Callable[[], None]]:
        """{'naive', 'vectorised'}: one training step of the capsule head alone, each way, on the trunk
        features of `size` (H, W) images."""


class Backend(Protocol):
    name: str
    # native file formats this backend writes with `export_bytes` (`capsctl export --format`)
    export_formats: tuple[str, ...]

    def is_available(self) -> bool: ...

    def describe(self) -> str:
        """Framework version and device, for logs and `capsctl bench`."""

    def runner(self, spec: ModelSpec, weights: Mapping[str, np.ndarray]) -> Runner: ...

    def trainer(self, spec: ModelSpec, weights: Mapping[str, np.ndarray], optim: OptimConfig) -> Trainer: ...

    def export_bytes(self, spec: ModelSpec, weights: Mapping[str, np.ndarray], format: str) -> bytes:
        """The model in one of `export_formats` (`capsctl export`); the caller writes the file atomically."""

    def import_native(self, path: str) -> tuple[ModelSpec, Weights]:
        """Read a file written by `export_bytes` back to spec + canonical weights (`capsctl import`)."""

    def bench_kernels(self) -> BenchKernels:
        """The kernels `capsctl bench` times (imports the framework)."""

    def distributed(self) -> Engine:
        """Data-parallel training with the framework's own engine (capsctl.training.distributed)."""


def available_names() -> list[str]:
    names = dict(BUILTIN)
    for ep in entry_points(group="capsctl.backends"):
        names.setdefault(ep.name, ep.value)
    return sorted(names)


def _target(name: str) -> str:
    for ep in entry_points(group="capsctl.backends"):
        if ep.name == name:
            return ep.value
    if name in BUILTIN:
        return BUILTIN[name]
    raise CapsctlError(f"unknown backend {name!r} (known: {', '.join(available_names())})")


def get_backend(name: str) -> Backend:
    """Import and instantiate backend `name`; clear error if its framework is missing."""
    module_name, _, attr = _target(name).partition(":")
    install = f"install it with: pip install '{EXTRAS.get(name, module_name)}'"
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:
        raise CapsctlError(f"backend {name!r} cannot be loaded ({e}); {install}") from None
    backend: Backend = getattr(module, attr)()
    if not backend.is_available():
        raise CapsctlError(f"backend {name!r} is not installed; {install}")
    return backend
