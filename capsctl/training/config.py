"""What a training run is: its settings (`TrainConfig`), learning-rate schedule and batch order."""

from __future__ import annotations

import json
import math
from collections.abc import Iterator
from dataclasses import asdict, dataclass

import numpy as np

from capsctl.errors import CapsctlError
from capsctl.training.recipes import SCHEDULES


@dataclass(frozen=True)
class TrainConfig:
    backend: str = "torch"  # framework that runs the steps
    dataset: str = "mnist"  # data set name (see `capsctl data list`)
    epochs: int = 20  # passes over the training images
    batch_size: int = 128  # images per optimiser step
    lr: float = 3e-3  # learning rate (the peak of the one-cycle schedule)
    schedule: str = "onecycle"  # 'constant' or 'onecycle'
    shift: int = 3  # random ±shift pixel translation of training images (0 = off)
    scale: float = 0.0  # random zoom of training images by a factor in [1 - scale, 1 + scale] (0 = off)
    weight_decay: float = 0.0  # AdamW decoupled weight decay
    seed: int = 0  # initial weights, data order and augmentation
    limit: int | None = None  # train on the first N images only (smoke runs)
    recipe: str = "default"  # the recipe these values came from (for the record)

    def __post_init__(self) -> None:
        if self.epochs < 1:
            raise CapsctlError(f"--epochs must be at least 1, got {self.epochs}")
        if not 1 <= self.batch_size <= 65536:
            raise CapsctlError(f"--batch-size must be in 1..65536, got {self.batch_size}")
        if not (math.isfinite(self.lr) and 0 < self.lr <= 10):
            raise CapsctlError(f"--lr must be in (0, 10], got {self.lr}")
        if self.schedule not in SCHEDULES:
            raise CapsctlError(f"--schedule must be one of {', '.join(SCHEDULES)}, got {self.schedule!r}")
        if not 0 <= self.shift <= 14:
            raise CapsctlError(f"--shift must be in 0..14 pixels, got {self.shift}")
        if not (math.isfinite(self.scale) and 0 <= self.scale <= 0.5):
            raise CapsctlError(f"--scale must be in [0, 0.5], got {self.scale}")
        if not (math.isfinite(self.weight_decay) and 0 <= self.weight_decay < 1):
            raise CapsctlError(f"--weight-decay must be in [0, 1), got {self.weight_decay}")
        if self.seed < 0:
            raise CapsctlError(f"--seed must be non-negative, got {self.seed}")
        if self.limit is not None and self.limit < 1:
            raise CapsctlError(f"--limit must be at least 1, got {self.limit}")

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_json(cls, text: str) -> TrainConfig:
        return cls(**json.loads(text))


def lr_at(cfg: TrainConfig, step: int, total: int) -> float:
    """Learning rate for global step `step` of `total`.

    one-cycle: cosine rise from lr/25 to lr over the first 30% of steps, cosine fall to lr/25e4.
    """
    if cfg.schedule == "constant":
        return cfg.lr
    warm = max(1, int(0.3 * total))
    lo, hi, end = cfg.lr / 25.0, cfg.lr, cfg.lr / 25e4
    if step < warm:
        t = step / warm
        return lo + (hi - lo) * (1 - math.cos(math.pi * t)) / 2
    t = min(1.0, (step - warm) / max(1, total - warm))
    return end + (hi - end) * (1 + math.cos(math.pi * t)) / 2


def epoch_order(seed: int, epoch: int, n: int) -> np.ndarray:
    return np.random.default_rng([seed, epoch]).permutation(n)


def batches(cfg: TrainConfig, epoch: int, n: int) -> Iterator[tuple[int, np.ndarray]]:
    order = epoch_order(cfg.seed, epoch, n)
    for step, start in enumerate(range(0, n, cfg.batch_size)):
        yield step, order[start : start + cfg.batch_size]


def steps_per_epoch(cfg: TrainConfig, n: int) -> int:
    return -(-n // cfg.batch_size)
