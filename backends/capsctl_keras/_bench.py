"""Framework kernels for `capsctl bench` on Keras 3 / TensorFlow: a large sgemm and the routing pair.

Imported only in the benchmark's child process for the keras backend (after capsctl_keras has
pinned Keras to TensorFlow). Both routings run as tf.functions, as Keras training does.
"""

from __future__ import annotations

import os
from collections.abc import Callable

import numpy as np

from capsctl.model.spec import EPS, ModelSpec
from capsctl_keras._env import tf
from capsctl_keras._layers import capsule_head


def threads() -> dict[str, int]:
    # 0 means TensorFlow's default (all cores); forcing 2 measured slower, see docs/PERFORMANCE.md
    return {
        "intra_op": tf.config.threading.get_intra_op_parallelism_threads() or (os.cpu_count() or 0),
        "inter_op": tf.config.threading.get_inter_op_parallelism_threads() or (os.cpu_count() or 0),
    }


def sgemm(n: int) -> Callable[[], None]:
    """One float32 n×n×n matmul per call (2·n³ FLOPs)."""
    gen = tf.random.Generator.from_seed(0)
    a = gen.normal((n, n), dtype=tf.float32)
    b = gen.normal((n, n), dtype=tf.float32)

    def run() -> None:
        c = tf.linalg.matmul(a, b)
        c[0, 0].numpy()  # wait for it (asynchronous on a GPU)

    return run


def _squash(s: tf.Tensor, kind: str) -> tf.Tensor:
    n2 = tf.reduce_sum(s * s, axis=-1, keepdims=True) + EPS
    return s * tf.sqrt(n2) / ((0.5 if kind == "su" else 1.0) + n2)


def _norm(s: tf.Tensor) -> tf.Tensor:
    return tf.sqrt(tf.reduce_sum(s * s, axis=-1) + EPS)


def naive_scores(f: tf.Tensor, kernel: tf.Variable, spec: ModelSpec) -> tf.Tensor:
    """Capsule head the way early Keras code wrote it: a Python loop over the input capsules,
    one small op per capsule per routing iteration (`map_fn` style), same formulas as ours."""
    caps = spec.capsule
    j, d = spec.num_classes, caps.dim
    _, gh, gw, c = f.shape
    n = gh * gw
    u = tf.reshape(f, (-1, n, c))
    shared = len(kernel.shape) == 2
    u_hat = [tf.reshape(u[:, i] @ (kernel if shared else kernel[i]), (-1, j, d)) for i in range(n)]
    b = [tf.zeros_like(u_hat[i][..., 0]) for i in range(n)]
    v = None
    for r in range(1, caps.routings + 1):
        cs = [tf.nn.softmax(b_i, axis=1) for b_i in b]
        s = u_hat[0] * cs[0][..., None]
        for i in range(1, n):
            s = s + u_hat[i] * cs[i][..., None]
        v = _squash(s, caps.squash)
        if r < caps.routings:
            target = s / _norm(s)[..., None] if caps.routing == "su-unit" else v
            agree = [tf.reduce_sum(u_hat[i] * target, axis=-1) for i in range(n)]
            b = [b[i] + agree[i] for i in range(n)] if caps.routing == "sabour" else agree
    return _norm(v)


def input_space_scores(f: tf.Tensor, kernel: tf.Variable, spec: ModelSpec) -> tf.Tensor:
    """A suggestion for the keras backend, timed beside it (shared kernel only): the torch backend's
    routing, which never builds û. û_j|i = u_i·W_j is linear in u_i, so s_j = (Σ_i c_ij u_i)·W_j
    and û_j|i·v_j = u_i·(W_j v_j)."""
    caps = spec.capsule
    j, d = spec.num_classes, caps.dim
    _, gh, gw, c = f.shape
    u = tf.reshape(f, (-1, gh * gw, c))  # (B, N, C)
    w = tf.reshape(kernel, (c, j, d))
    b = None
    v = None
    for r in range(1, caps.routings + 1):
        if b is None:
            cu = tf.repeat(tf.reduce_sum(u, axis=1, keepdims=True) / j, j, axis=1)  # softmax(0) = 1/J
        else:
            cu = tf.einsum("bjn,bnc->bjc", tf.nn.softmax(b, axis=1), u)
        s = tf.einsum("bjc,cjd->bjd", cu, w)
        v = _squash(s, caps.squash)
        if r < caps.routings:
            target = s / _norm(s)[..., None] if caps.routing == "su-unit" else v
            agree = tf.einsum("bnc,bjc->bjn", u, tf.einsum("cjd,bjd->bjc", w, target))
            b = agree if caps.routing != "sabour" or b is None else b + agree
    return _norm(v)


def routing_fns(
    spec: ModelSpec, kernel: np.ndarray, batch: int, size: tuple[int, int] = (28, 28)
) -> dict[str, Callable[[], None]]:
    """Forward + backward of the capsule head (û and routing) on fixed trunk features of `size` images,
    two ways."""
    gh, gw = spec.trunk_grid(*size)
    f = tf.random.Generator.from_seed(0).uniform((batch, gh, gw, spec.trunk_channels), dtype=tf.float32)
    head = capsule_head(spec)
    head.build(f.shape)
    head.kernel.assign(kernel)

    # as in training, the gradient flows on into the trunk: differentiate w.r.t. the features too
    @tf.function
    def ours() -> tf.Tensor:
        with tf.GradientTape() as tape:
            tape.watch(f)
            loss = tf.reduce_sum(head(f))
        gk, gf = tape.gradient(loss, [head.kernel, f])
        return tf.reduce_sum(gk) + tf.reduce_sum(gf)

    @tf.function
    def naive() -> tf.Tensor:
        with tf.GradientTape() as tape:
            tape.watch(f)
            loss = tf.reduce_sum(naive_scores(f, head.kernel, spec))
        gk, gf = tape.gradient(loss, [head.kernel, f])
        return tf.reduce_sum(gk) + tf.reduce_sum(gf)

    fns = {"naive": lambda: naive().numpy(), "vectorised": lambda: ours().numpy()}
    if spec.capsule.shared:
        @tf.function
        def linear() -> tf.Tensor:
            with tf.GradientTape() as tape:
                tape.watch(f)
                loss = tf.reduce_sum(input_space_scores(f, head.kernel, spec))
            gk, gf = tape.gradient(loss, [head.kernel, f])
            return tf.reduce_sum(gk) + tf.reduce_sum(gf)

        fns["input_space"] = lambda: linear().numpy()
    return fns
