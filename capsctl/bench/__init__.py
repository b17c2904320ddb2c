"""`capsctl bench`: what it measures, by name (numpy-free, so the command line builds its options from it).

A *variant* is what one training measurement runs: each head of the spec, and `capsule+decoder`, the
capsule head with the reconstruction decoder ({"hidden": [512, 1024]} on 28×28×1) and its loss, timed
interleaved with the plain capsule head (its reference) and reported as their ratio."""

from __future__ import annotations

from capsctl.choices import HEADS

DECODER = "capsule+decoder"
VARIANTS = (*HEADS, DECODER)
# `--arch A` measures the preset's capsule model as the variant "arch:A" (training only: the non-shared
# presets see images of their design size alone: 28x28 digits, 36x36 for efficient-multimnist)
ARCH_PREFIX = "arch:"
