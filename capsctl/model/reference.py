"""A plain numpy implementation of the model, written straight from the formulas.

It is slow and exists to check the backends: every backend must agree with it (tests), and
`capsctl inspect` can fall back on it for a single image. Shapes: images (B, H, W, C) channels-last.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view

from capsctl.model.spec import BN_EPS, EPS, ConvLayer, ModelSpec


def conv2d_valid(
    x: np.ndarray, kernel: np.ndarray, bias: np.ndarray, stride: int = 1, padding: str = "valid"
) -> np.ndarray:
    """Convolution (cross-correlation, as every framework computes it) of channels-last x with a
    [kh, kw, in, out] kernel; 'same' pads (k-1)/2 zeros each side (odd kernels, stride 1)."""
    kh, kw = kernel.shape[:2]
    if padding == "same":
        x = np.pad(x, ((0, 0), (kh // 2, kh // 2), (kw // 2, kw // 2), (0, 0)))
    win = sliding_window_view(x, (kh, kw), axis=(1, 2))[:, ::stride, ::stride]  # (B, H', W', C, kh, kw)
    return np.einsum("bhwcij,ijco->bhwo", win, kernel, optimize=True) + bias


def avgpool(x: np.ndarray, size: int) -> np.ndarray:
    b, h, w, c = x.shape
    h2, w2 = h // size, w // size
    x = x[:, : h2 * size, : w2 * size]
    return x.reshape(b, h2, size, w2, size, c).mean(axis=(2, 4))


def trunk(spec: ModelSpec, weights: Mapping[str, np.ndarray], x: np.ndarray) -> np.ndarray:
    k = 0
    for layer in spec.trunk:
        if isinstance(layer, ConvLayer):
            z = conv2d_valid(
                x, weights[f"trunk.{k}.kernel"], weights[f"trunk.{k}.bias"], layer.stride, layer.padding
            )
            x = np.maximum(z, 0.0)
            if layer.batchnorm:  # inference: the running statistics
                bn = {stat: weights[f"trunk.{k}.bn.{stat}"] for stat in ("gamma", "beta", "mean", "var")}
                x = bn["gamma"] * (x - bn["mean"]) / np.sqrt(bn["var"] + BN_EPS) + bn["beta"]
            k += 1
        else:
            x = avgpool(x, layer.size)
    return x


def norm(s: np.ndarray, axis: int = -1) -> np.ndarray:
    return np.sqrt(np.sum(s * s, axis=axis, keepdims=True) + EPS)


def squash(s: np.ndarray, kind: str) -> np.ndarray:
    n2 = np.sum(s * s, axis=-1, keepdims=True) + EPS
    if kind == "efficient":  # Efficient-CapsNet: (1 - e^-|s|)·s/|s| (-expm1: exact near |s| = 0)
        n = np.sqrt(n2)
        return -np.expm1(-n) * s / n
    return s * np.sqrt(n2) / ((0.5 if kind == "su" else 1.0) + n2)


def softmax(b: np.ndarray, axis: int) -> np.ndarray:
    e = np.exp(b - b.max(axis=axis, keepdims=True))
    return e / e.sum(axis=axis, keepdims=True)


@dataclass
class RoutingTrace:
    couplings: np.ndarray  # (B, R, J, N): c_ij used in iteration r, sums to 1 over j
    agreement: np.ndarray  # (B, R, J, N): û_j|i · squash(s_j) of iteration r


def route_attention(
    u_hat: np.ndarray, bias: np.ndarray, squash_kind: str
) -> tuple[np.ndarray, RoutingTrace]:
    """Efficient-CapsNet's self-attention routing, one pass, on û (B, N, J, D) and the log prior b (N, J):
    a_ij = Σ_k û_j|i·û_j|k / sqrt(D), c_ij = softmax over j of a_ij, s_j = Σ_i (c_ij + b_ij) û_j|i,
    v_j = squash(s_j). The trace holds c (sums to 1 over j) and the agreement û_j|i·v_j (R = 1)."""
    d = u_hat.shape[-1]
    a = np.einsum("bnjd,bjd->bjn", u_hat, u_hat.sum(axis=1)) / np.sqrt(d)  # Σ_k û_j|i·û_j|k
    c = softmax(a, axis=1)
    s = np.einsum("bjn,bnjd->bjd", c + bias.T[None], u_hat)
    v = squash(s, squash_kind)
    agree = np.einsum("bnjd,bjd->bjn", u_hat, v)
    return v, RoutingTrace(c[:, None], agree[:, None])


def route(
    u_hat: np.ndarray, routings: int, routing: str, squash_kind: str
) -> tuple[np.ndarray, RoutingTrace]:
    """Dynamic routing on û (B, N, J, D); returns v (B, J, D) and the per-iteration trace."""
    bsz, n, j, _ = u_hat.shape
    b = np.zeros((bsz, j, n), u_hat.dtype)
    cs, ags = [], []
    v = None
    for r in range(1, routings + 1):
        c = softmax(b, axis=1)
        s = np.einsum("bjn,bnjd->bjd", c, u_hat)
        v_r = squash(s, squash_kind)
        cs.append(c)
        ags.append(np.einsum("bnjd,bjd->bjn", u_hat, v_r))
        if routing == "su-unit":
            if r < routings:
                b = np.einsum("bnjd,bjd->bjn", u_hat, s / norm(s))
            v = v_r
        else:
            v = v_r
            if r < routings:
                agree = np.einsum("bnjd,bjd->bjn", u_hat, v)
                b = agree if routing == "su" else b + agree
    assert v is not None
    return v, RoutingTrace(np.stack(cs, 1), np.stack(ags, 1))


def capsule_inputs(
    features: np.ndarray, spec: ModelSpec | None = None, weights: Mapping[str, np.ndarray] | None = None
) -> np.ndarray:
    """Trunk output (B, H, W, C) -> the routing's input capsules (B, N, C'): the positions, row-major over
    (H, W); with primary capsules (spec.capsule.primary), the primary convolution's output read as
    (B, H'·W'·TYPES, DIM), row-major over (row, column, type), each capsule squashed."""
    b, h, w, c = features.shape
    primary = spec.capsule.primary if spec is not None else None
    if primary is None:
        return features.reshape(b, h * w, c)
    assert spec is not None and weights is not None
    kernel, bias = weights["head.primary.kernel"], weights["head.primary.bias"]
    if primary.kind == "depthwise":  # channel c convolved with its own filter only
        step = primary.stride
        win = sliding_window_view(features, kernel.shape[:2], axis=(1, 2))[:, ::step, ::step]
        z = np.einsum("bhwcij,ijc->bhwc", win, kernel[..., 0], optimize=True) + bias
    else:
        z = conv2d_valid(features, kernel, bias, primary.stride)
    caps = z.reshape(b, z.shape[1] * z.shape[2] * primary.types, primary.dim)
    return squash(caps, spec.capsule.squash)


def predictions(
    spec: ModelSpec, weights: Mapping[str, np.ndarray], u: np.ndarray
) -> np.ndarray:
    """û_j|i (B, N, J, D) from input capsules (B, N, C)."""
    j, d = spec.num_classes, spec.capsule.dim
    kernel = weights["head.capsule.kernel"]
    if kernel.ndim == 2:
        uh = u @ kernel
    else:
        uh = np.einsum("bnc,nck->bnk", u, kernel)
    return uh.reshape(u.shape[0], u.shape[1], j, d)


def forward(
    spec: ModelSpec, weights: Mapping[str, np.ndarray], x: np.ndarray, routings: int | None = None
) -> tuple[np.ndarray, RoutingTrace | None]:
    """Class scores (B, J), and for the capsule head the routing trace."""
    x = np.asarray(x, np.float64)
    w64 = {k: np.asarray(v, np.float64) for k, v in weights.items()}
    f = trunk(spec, w64, x)
    if spec.head == "pool":
        g = f.mean(axis=(1, 2))
        h = np.maximum(g @ w64["head.dense0.kernel"] + w64["head.dense0.bias"], 0.0)
        z = h @ w64["head.dense1.kernel"] + w64["head.dense1.bias"]
        return 1.0 / (1.0 + np.exp(-z)), None
    u_hat = predictions(spec, w64, capsule_inputs(f, spec, w64))
    v, trace = _route(spec, w64, u_hat, routings)
    return norm(v)[..., 0], trace


def _route(
    spec: ModelSpec, w64: Mapping[str, np.ndarray], u_hat: np.ndarray, routings: int | None = None
) -> tuple[np.ndarray, RoutingTrace]:
    caps = spec.capsule
    if caps.routing == "attention":
        return route_attention(u_hat, w64["head.capsule.bias"], caps.squash)
    return route(u_hat, routings or caps.routings, caps.routing, caps.squash)


def capsules(spec: ModelSpec, weights: Mapping[str, np.ndarray], x: np.ndarray) -> np.ndarray:
    """The output capsules v (B, J, D) of a capsule head (float64)."""
    w64 = {k: np.asarray(v, np.float64) for k, v in weights.items()}
    f = trunk(spec, w64, np.asarray(x, np.float64))
    u_hat = predictions(spec, w64, capsule_inputs(f, spec, w64))
    v, _ = _route(spec, w64, u_hat)
    return v


def mask(v: np.ndarray, classes: np.ndarray) -> np.ndarray:
    """v (B, J, D) with every capsule but classes[b] set to zero."""
    keep = np.arange(v.shape[1])[None, :] == np.asarray(classes).reshape(-1, 1)
    return v * keep[..., None]


def decode(spec: ModelSpec, weights: Mapping[str, np.ndarray], masked: np.ndarray) -> np.ndarray:
    """Decoder on masked capsules (B, J, D): Dense+ReLU per hidden width, Dense+sigmoid -> (B, H, W, C)."""
    dec = spec.decoder
    assert dec is not None and dec.image_shape is not None
    h = np.asarray(masked, np.float64).reshape(len(masked), -1)
    last = len(dec.hidden)
    for k in range(last + 1):
        z = h @ np.asarray(weights[f"decoder.dense{k}.kernel"], np.float64)
        z = z + np.asarray(weights[f"decoder.dense{k}.bias"], np.float64)
        h = np.maximum(z, 0.0) if k < last else 1.0 / (1.0 + np.exp(-z))
    return h.reshape(len(h), *dec.image_shape)


def reconstruct(
    spec: ModelSpec, weights: Mapping[str, np.ndarray], x: np.ndarray, classes: np.ndarray
) -> np.ndarray:
    """Reconstructions (B, H, W, C) of images x from the capsule classes[b] alone."""
    return decode(spec, weights, mask(capsules(spec, weights, x), classes))


def reconstruction_loss(recon: np.ndarray, x: np.ndarray) -> float:
    """Σ over pixels of (reconstruction − input)², mean over the batch."""
    diff = np.asarray(recon, np.float64) - np.asarray(x, np.float64)
    return float((diff * diff).reshape(len(diff), -1).sum(axis=1).mean())


def margin_loss(p: np.ndarray, y_onehot: np.ndarray) -> float:
    per = y_onehot * np.maximum(0.9 - p, 0) ** 2 + 0.25 * (1 - y_onehot) * np.maximum(p - 0.1, 0) ** 2
    return float(per.mean(axis=1).mean())
