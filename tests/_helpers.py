"""Inputs shared by the backend tests: real digits and weights that make routing non-trivial."""

from __future__ import annotations

import numpy as np

from capsctl.model.weights import init_weights

VARIANTS = [(r, s) for r in ("su", "sabour", "su-unit") for s in ("su", "sabour")]


def real_digits(mnist, n: int = 4, height: int = 28) -> np.ndarray:
    """n real test digits, or (height 56) n vertical pairs of them."""
    x = mnist.test().images[:n]
    return np.concatenate([x, mnist.test().images[n : 2 * n]], axis=1) if height == 56 else x


def routing_weights(spec, seed: int = 1) -> dict[str, np.ndarray]:
    """Glorot weights with positive biases: non-trivial routing on real digits."""
    w = init_weights(spec, seed)
    rng = np.random.default_rng(seed)
    for k, v in w.items():
        if k.endswith(".bias"):
            w[k] = rng.uniform(0, 0.05, v.shape).astype(np.float32)
        elif k == "head.capsule.kernel" and v.ndim == 3:
            w[k] = v * 8  # per-position Glorot fans are 64x larger; restore scores of a useful size
    return w
