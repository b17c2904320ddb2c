"""`capsctl train --compose overlap`: training on pairs of overlapping digits (the MultiMNIST protocol of
Sabour et al. 2017), and the test pairs such a run is scored on.

Each epoch pairs every training image i (the first digit of composite i) with a training image of
another class drawn uniformly from all of them, places both at random offsets in a (H+8)x(W+8) canvas
and merges them by pixel-wise maximum: the 'overlap' layout of capsctl.data.composites
(`overlay`, OVERLAP_SHIFT = 4). The target is both labels (a two-hot vector).

The draws, per epoch, come from `numpy.random.default_rng([seed, epoch])`: first the epoch's batch
order (capsctl.training.config.epoch_order makes the same generator; its draw is skipped here so the
partners are not made from the same random numbers as the order), then one partner per image, then
the offsets (N, 2, 2). They depend only on (seed, epoch) and the labels, so a resumed run and an
uninterrupted one see the same composites, and a distributed job composes the global batch before its
ranks slice it, so the composites do not depend on the number of ranks.

With a decoder, each digit is redrawn from its own class's capsule alone against that digit alone, at
its place in the canvas (`digit_targets`); the decoder draws canvas-sized images."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from capsctl.backend import DigitTargets
from capsctl.data.composites import OVERLAP_SHIFT, make_composites, overlay
from capsctl.data.datasets import Split
from capsctl.errors import CapsctlError

# the test pairs a --compose run is scored on: `capsctl eval-pairs --layout overlap` at its default seed
TEST_SEED = 0


@dataclass(frozen=True)
class EpochPairs:
    """One epoch's composites, by the index of their first digit."""

    partners: np.ndarray  # int64 (N,): the second digit of composite i, a training image of another class
    offsets: np.ndarray  # int64 (N, 2, 2): (row, col) of the first and second digit in the canvas


def canvas(h: int, w: int) -> tuple[int, int]:
    """The size of an overlap composite of h x w digits."""
    return h + 2 * OVERLAP_SHIFT, w + 2 * OVERLAP_SHIFT


def check_classes(labels: np.ndarray, what: str) -> None:
    """A pair needs two classes: refuse images of fewer."""
    classes = np.unique(labels)
    if len(classes) < 2:
        held = f"only class {int(classes[0])}" if len(classes) else "no images"
        raise CapsctlError(
            f"--compose overlap pairs digits of two different classes; the {what} hold {held}"
        )


def draw_pairs(labels: np.ndarray, seed: int, epoch: int) -> EpochPairs:
    """Epoch `epoch`'s partners and offsets for training images of these labels (at least two classes)."""
    n = len(labels)
    rng = np.random.default_rng([seed, epoch])
    rng.permutation(n)  # the epoch's batch order (config.epoch_order): the draws below come after it
    by_class = np.argsort(labels, kind="stable")
    classes, start, count = np.unique(labels[by_class], return_index=True, return_counts=True)
    if len(classes) < 2:
        raise CapsctlError("--compose overlap needs training images of at least two classes")
    c = np.searchsorted(classes, labels)
    # a uniform position among the images of the other classes (by_class without class c's run)
    r = rng.integers(0, n - count[c])
    partners = by_class[r + np.where(r >= start[c], count[c], 0)]
    offsets = rng.integers(0, 2 * OVERLAP_SHIFT + 1, size=(n, 2, 2))
    return EpochPairs(partners.astype(np.int64), offsets)


def compose_batch(
    x: np.ndarray, y: np.ndarray, pairs: EpochPairs, idx: np.ndarray, num_classes: int, light: bool = False
) -> tuple[np.ndarray, np.ndarray]:
    """The composites whose first digits are `idx`: (images (B, H+8, W+8, C), two-hot targets (B, J)).
    `light`: the digits are dark ink on light (the spec's background), merged on a white canvas."""
    second = pairs.partners[idx]
    images = overlay(np.stack([x[idx], x[second]], axis=1), pairs.offsets[idx], light)
    target = np.zeros((len(idx), num_classes), np.float32)
    rows = np.arange(len(idx))
    target[rows, y[idx]] = 1.0
    target[rows, y[second]] = 1.0
    return images, target


def digit_targets(
    x: np.ndarray, y: np.ndarray, pairs: EpochPairs, idx: np.ndarray, num_classes: int, light: bool = False
) -> DigitTargets:
    """What a decoder redraws from the composites `compose_batch` makes of `idx`: each digit alone at its
    place in the canvas (the paper's target: one digit, not the composite), with its class."""
    digits = np.stack([idx, pairs.partners[idx]], axis=1)  # (B, 2)
    offsets = pairs.offsets[idx]
    images = np.stack(
        [overlay(x[digits[:, k : k + 1]], offsets[:, k : k + 1], light) for k in range(2)], axis=1
    )
    onehots = np.eye(num_classes, dtype=np.float32)[y[digits]]
    return DigitTargets(images, onehots)


def scoring_pairs(test: Split, limit: int | None, light: bool = False) -> Split:
    """The overlap pairs of test digits that `capsctl eval-pairs --layout overlap [--eval-limit N]` scores
    (seed 0, the first `limit`): images (M, H+8, W+8, C), labels (M, 2) (a Split whose labels are pairs)."""
    comp = make_composites(
        test.images, test.labels, digits=2, layout="overlap", seed=TEST_SEED, limit=limit, light=light
    )
    if len(comp.labels) == 0:
        raise CapsctlError("--compose overlap: no pair of test images of two different classes to score on")
    return Split(comp.images, comp.labels)
