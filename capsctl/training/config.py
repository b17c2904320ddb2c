"""What a training run is: its settings (`TrainConfig`), learning-rate schedule and batch order.

numpy is imported only where batches are drawn, so the command line can import this module (and
the experiment plans built on it) without slowing `capsctl --help`."""

from __future__ import annotations

import json
import math
from collections.abc import Iterator
from dataclasses import asdict, dataclass, fields
from typing import TYPE_CHECKING

from capsctl.choices import COMPOSE
from capsctl.errors import CapsctlError
from capsctl.training.recipes import RECIPES, SCHEDULES

if TYPE_CHECKING:
    import numpy as np

# each setting's allowed values as `--help` states them (TrainConfig's checks below enforce them)
RANGE_TEXT = {
    "epochs": "at least 1",
    "batch_size": "1–65536",
    "lr": "0 < LR ≤ 10",
    "shift": "0–14 px",
    "scale": "0–0.5",
    "weight_decay": "0 ≤ WD < 1",
    "recon_weight": "0–1000",
}

_DEFAULT = RECIPES["default"]  # the defaults below are the default recipe's (capsule and pool epochs agree)


@dataclass(frozen=True)
class TrainConfig:
    """Every setting that shapes a run. Stored as JSON in its checkpoint, so `--resume RUN` needs
    nothing else; a field added later needs a default, so older checkpoints still load."""

    backend: str = "torch"  # framework that runs the steps
    dataset: str = "mnist-5k"  # data set name (see `capsctl data list`), or the path of the user's data
    image_size: str | None = None  # 'HxW': --dataset PATH images scaled to fit this size (None: as they are)
    epochs: int = _DEFAULT.capsule_epochs  # passes over the training images
    batch_size: int = _DEFAULT.batch_size  # images per optimiser step
    lr: float = _DEFAULT.lr  # learning rate (the peak of the one-cycle schedule)
    schedule: str = _DEFAULT.schedule  # 'constant' or 'onecycle'
    shift: int = _DEFAULT.shift  # random ±shift pixel translation of training images (0 = off)
    scale: float = _DEFAULT.scale  # random zoom by a factor in [1 - scale, 1 + scale] (0 = off)
    weight_decay: float = _DEFAULT.weight_decay  # AdamW decoupled weight decay
    seed: int = 0  # initial weights, data order and augmentation
    limit: int | None = None  # train on the first N images only (smoke runs)
    recipe: str = _DEFAULT.name  # the recipe these values came from (for the record)
    data_dir: str | None = None  # the --data-dir the data came from (absolute), None: the usual search
    eval_limit: int | None = None  # score the final model on the first N test images only (None: all)
    # epochs before the last are scored on the first N of those only (a curve for the log, ~10x cheaper
    # than the full test set); None scores every epoch on all of them
    curve_images: int | None = 1000
    # weight of the decoder's reconstruction loss (models with a decoder); None: 0.0005 · 784 / (H·W·C)
    recon_weight: float | None = None
    # score on N (or this fraction of the) training images held out by a fixed draw, not the test set:
    # what a --dataset folder without test/ needs
    holdout: int | None = None
    val_fraction: float | None = None
    # train on composites instead of single digits: 'overlap' pairs each training image with one of another
    # class, each shifted within (H+8)x(W+8) and merged by pixel-wise maximum (Sabour et al. 2017's
    # MultiMNIST), re-drawn every epoch (capsctl.training.compose); None: single digits
    compose: str | None = None

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
        if self.eval_limit is not None and self.eval_limit < 1:
            raise CapsctlError(f"--eval-limit must be at least 1, got {self.eval_limit}")
        rw = self.recon_weight
        if rw is not None and not (math.isfinite(rw) and 0 <= rw <= 1e3):
            raise CapsctlError(f"--recon-weight must be in [0, 1000], got {self.recon_weight}")
        if self.curve_images is not None and self.curve_images < 1:
            raise CapsctlError(f"--curve-images must be at least 1, got {self.curve_images}")
        if self.holdout is not None and self.holdout < 1:
            raise CapsctlError(f"--holdout must be at least 1, got {self.holdout}")
        if self.val_fraction is not None and not 0 < self.val_fraction < 1:
            raise CapsctlError(f"--val-fraction must be between 0 and 1 (exclusive), got {self.val_fraction}")
        if self.holdout is not None and self.val_fraction is not None:
            raise CapsctlError("give --holdout N or --val-fraction F, not both")
        if self.compose is not None:
            if self.compose not in COMPOSE:
                raise CapsctlError(f"--compose must be one of {', '.join(COMPOSE)}, got {self.compose!r}")
            if self.shift or self.scale:
                raise CapsctlError(
                    f"--compose {self.compose} already shifts each digit at random inside its canvas; "
                    "leave out --shift and --scale"
                )

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_json(cls, text: str) -> TrainConfig:
        given = json.loads(text)
        if not isinstance(given, dict):
            raise TypeError(f"the settings are a JSON {type(given).__name__}, not an object")
        # runs started before curve_images existed scored every epoch on the full test set: keep doing so
        given.setdefault("curve_images", None)
        for field in fields(cls):
            if field.name in given:
                _check_json_type(field.name, str(field.type), given[field.name])
        return cls(**given)


_JSON_TYPES: dict[str, tuple[type, ...]] = {"int": (int,), "float": (int, float), "str": (str,)}


def _check_json_type(name: str, annotation: str, value: object) -> None:
    """A stored setting of its field's type (an edited checkpoint's 32.5 for batch_size, or true for epochs,
    passed __post_init__'s ranges and failed deep in training, a TypeError traceback on --resume)."""
    kinds = [k.strip() for k in annotation.split("|")]
    if value is None and "None" in kinds:
        return
    allowed = tuple(t for k in kinds for t in _JSON_TYPES.get(k, ()))
    if isinstance(value, bool) or not isinstance(value, allowed):
        raise TypeError(f"{name} is {value!r}, expected {annotation}")


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
    import numpy as np

    return np.random.default_rng([seed, epoch]).permutation(n)


def batches(cfg: TrainConfig, epoch: int, n: int) -> Iterator[tuple[int, np.ndarray]]:
    order = epoch_order(cfg.seed, epoch, n)
    for step, start in enumerate(range(0, n, cfg.batch_size)):
        yield step, order[start : start + cfg.batch_size]


def steps_per_epoch(cfg: TrainConfig, n: int) -> int:
    return -(-n // cfg.batch_size)
