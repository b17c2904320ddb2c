"""The model as Keras 3 layers: trunk, capsule head with dynamic routing, pooling head.

Formulas follow the spec contract (capsctl.spec). Routing is written with `einsum` only: the
public Keras capsule code bases broke when `batch_dot` changed its axes semantics between
releases, and einsum strings say exactly which axes are summed. Tensors of the capsule head are
û (B, J, N, D), logits b and couplings c (B, J, N), s and v (B, J, D), as in the torch backend.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any

from capsctl.model.spec import BN_EPS, BN_MOMENTUM, EPS, ConvLayer, ModelSpec

from ._env import keras, use_capsctl_defaults

ops = keras.ops
PACKAGE = "capsctl"


def squash(s: Any, kind: str) -> Any:
    n2 = ops.sum(s * s, axis=-1, keepdims=True) + EPS
    if kind == "efficient":  # Efficient-CapsNet: (1 - e^-|s|)·s/|s| (-expm1: exact near |s| = 0)
        n = ops.sqrt(n2)
        return -ops.expm1(-n) * s / n
    return s * ops.sqrt(n2) / ((0.5 if kind == "su" else 1.0) + n2)


def route_attention(u_hat: Any, bias: Any, squash_kind: str, trace: bool = False) -> tuple[Any, list, list]:
    """Efficient-CapsNet's self-attention routing, one pass, over û (B, J, N, D) with the log prior b
    (N, J): a_ij = û_j|i·(Σ_k û_j|k) / sqrt(D), c = softmax over j, s_j = Σ_i (c_ij + b_ij) û_j|i,
    v = squash(s); mirrors the torch backend's `route_attention`."""
    d = ops.shape(u_hat)[-1]
    a = ops.einsum("bjnd,bjd->bjn", u_hat, ops.sum(u_hat, axis=2)) / (float(d) ** 0.5)
    c = ops.softmax(a, axis=1)
    s = ops.einsum("bjn,bjnd->bjd", c + ops.transpose(bias), u_hat)
    v = squash(s, squash_kind)
    if not trace:
        return v, [], []
    return v, [c], [ops.einsum("bjnd,bjd->bjn", u_hat, v)]


def safe_norm(s: Any) -> Any:
    return ops.sqrt(ops.sum(s * s, axis=-1) + EPS)


def route(
    u_hat: Any, routings: int, routing: str, squash_kind: str, trace: bool = False
) -> tuple[Any, list, list]:
    """Dynamic routing over û (B, J, N, D). Returns v (B, J, D) and, if `trace`, per-iteration
    couplings c and agreements û·squash(s), each (B, J, N). The loop is unrolled (R is small)."""
    b = ops.zeros_like(u_hat[..., 0])
    cs: list = []
    ags: list = []
    v = None
    for r in range(1, routings + 1):
        c = ops.softmax(b, axis=1)  # over the output capsules j
        s = ops.einsum("bjn,bjnd->bjd", c, u_hat)  # s_j = Σ_i c_ij û_j|i
        v = squash(s, squash_kind)
        if trace:
            cs.append(c)
            ags.append(ops.einsum("bjnd,bjd->bjn", u_hat, v))
        if r < routings:
            if routing == "su-unit":
                b = ops.einsum("bjnd,bjd->bjn", u_hat, s / safe_norm(s)[..., None])
            else:
                agree = ops.einsum("bjnd,bjd->bjn", u_hat, v)
                b = agree if routing == "su" else b + agree
    return v, cs, ags


def route_shared(
    u: Any, kernel: Any, dim: int, routings: int, routing: str, squash_kind: str, trace: bool = False
) -> tuple[Any, list, list]:
    """The same routing as `route` for a shared kernel, without ever building û (B, J, N, D).

    û_j|i = u_i·W_j is linear in u_i, so s_j = (Σ_i c_ij u_i)·W_j and û_j|i·v_j = u_i·(W_j v_j):
    every step works on the inputs u (B, N, C). 2.6× fewer FLOPs for the seed model; mirrors the
    torch backend's `route_shared`. Results equal `route` up to float rounding."""
    bsz, n, c_in = ops.shape(u)
    w = ops.reshape(kernel, (c_in, -1, dim))  # (C, J, D)
    j = ops.shape(w)[1]
    b = None
    cs: list = []
    ags: list = []
    v = None
    for r in range(1, routings + 1):
        if b is None:  # softmax of zero logits is 1/J everywhere
            c = ops.ones((bsz, j, n), dtype=u.dtype) / j
            # the same Σ_i u_i / J for every j; (ops.repeat here made TF log a oneDNN int32 error line)
            s = ops.einsum("bc,cjd->bjd", ops.sum(u, axis=1) / j, w)
        else:
            c = ops.softmax(b, axis=1)  # over the output capsules j
            s = ops.einsum("bjc,cjd->bjd", ops.einsum("bjn,bnc->bjc", c, u), w)  # (Σ_i c_ij u_i)·W_j
        v = squash(s, squash_kind)
        if trace:
            cs.append(c)
            ags.append(ops.einsum("bnc,bjc->bjn", u, ops.einsum("cjd,bjd->bjc", w, v)))
        if r < routings:
            target = s / safe_norm(s)[..., None] if routing == "su-unit" else v
            agree = ops.einsum("bnc,bjc->bjn", u, ops.einsum("cjd,bjd->bjc", w, target))
            b = agree if routing != "sabour" or b is None else b + agree
    return v, cs, ags


@keras.saving.register_keras_serializable(package=PACKAGE)
class CapsuleHead(keras.layers.Layer):
    """Trunk features (B, H, W, C) -> class scores ‖v_j‖ (B, J).

    Input capsules are the feature positions, row-major over (H, W). With `shared` one kernel
    [C, J·D] serves every position, so any image size works; otherwise the kernel is [N, C, J·D].
    """

    def __init__(
        self, num_classes: int, dim: int, routings: int, routing: str, squash: str, shared: bool = True,
        num_inputs: int | None = None, with_capsules: bool = False, primary: dict[str, Any] | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.num_classes, self.dim, self.routings = num_classes, dim, routings
        self.routing, self.squash, self.shared, self.num_inputs = routing, squash, shared, num_inputs
        self.with_capsules = with_capsules  # call returns [scores, v (B, J, D)] (feeds the decoder)
        # primary capsules (capsctl.model.spec.PrimarySpec as a dict): kind, types, dim, kernel, stride
        self.primary = dict(primary) if primary is not None else None

    def build(self, input_shape: tuple) -> None:
        c, width = input_shape[-1], self.num_classes * self.dim
        # zeros: the values always come from capsctl.weights (identical start in every backend)
        p = self.primary
        if p is not None:
            channels = p["types"] * p["dim"]
            out = 1 if p["kind"] == "depthwise" else channels  # depthwise: one filter per channel
            self.primary_kernel = self.add_weight(
                name="primary_kernel", shape=(p["kernel"], p["kernel"], c, out), initializer="zeros"
            )
            self.primary_bias = self.add_weight(name="primary_bias", shape=(channels,), initializer="zeros")
            c = p["dim"]
        shape = (c, width) if self.shared else (self.num_inputs, c, width)
        self.kernel = self.add_weight(name="kernel", shape=shape, initializer="zeros")
        if self.routing == "attention":  # its log prior b (N, J)
            shape = (self.num_inputs, self.num_classes)
            self.bias = self.add_weight(name="bias", shape=shape, initializer="zeros")

    def inputs(self, f: Any) -> Any:
        """Features (B, H, W, C) -> the routing's input capsules u (B, N, C'): the positions, row-major
        over (H, W), or the squashed primary capsules, row-major over (row, column, type)."""
        p = self.primary
        if p is None:
            shape = ops.shape(f)
            return ops.reshape(f, (shape[0], -1, shape[3]))
        conv = ops.depthwise_conv if p["kind"] == "depthwise" else ops.conv
        z = conv(f, self.primary_kernel, strides=p["stride"], padding="valid", data_format="channels_last")
        z = z + self.primary_bias
        return squash(ops.reshape(z, (ops.shape(z)[0], -1, p["dim"])), self.squash)

    def predictions(self, f: Any) -> Any:
        """Features (B, H, W, C) -> û (B, J, N, D)."""
        u = self.inputs(f)
        j, d = self.num_classes, self.dim
        if self.shared:
            return ops.einsum("bnc,cjd->bjnd", u, ops.reshape(self.kernel, (-1, j, d)))
        return ops.einsum("bnc,ncjd->bjnd", u, ops.reshape(self.kernel, (self.num_inputs, -1, j, d)))

    def _route(self, f: Any, routings: int, trace: bool) -> tuple[Any, list, list]:
        if self.routing == "attention":
            return route_attention(self.predictions(f), self.bias, self.squash, trace)
        if self.shared:
            u = self.inputs(f)
            return route_shared(u, self.kernel, self.dim, routings, self.routing, self.squash, trace)
        return route(self.predictions(f), routings, self.routing, self.squash, trace)

    def call(self, f: Any) -> Any:
        v, _, _ = self._route(f, self.routings, False)
        return [safe_norm(v), v] if self.with_capsules else safe_norm(v)

    def capsules(self, f: Any) -> Any:
        """Output capsules v (B, J, D)."""
        return self._route(f, self.routings, False)[0]

    def trace(self, f: Any, routings: int | None = None) -> tuple[Any, Any, Any]:
        """Scores (B, J) and the stacked trace: couplings and agreements (B, R, J, N)."""
        v, cs, ags = self._route(f, routings or self.routings, True)
        return safe_norm(v), ops.stack(cs, axis=1), ops.stack(ags, axis=1)

    def compute_output_shape(self, input_shape: tuple) -> Any:
        scores = (input_shape[0], self.num_classes)
        return [scores, (input_shape[0], self.num_classes, self.dim)] if self.with_capsules else scores

    def get_config(self) -> dict[str, Any]:
        return {
            **super().get_config(),
            "num_classes": self.num_classes, "dim": self.dim, "routings": self.routings,
            "routing": self.routing, "squash": self.squash,
            "shared": self.shared, "num_inputs": self.num_inputs, "with_capsules": self.with_capsules,
            "primary": self.primary,
        }


def mask(v: Any, onehot: Any) -> Any:
    """v (B, J, D) with every capsule but the one-hot's set to zero."""
    return v * ops.expand_dims(ops.cast(onehot, v.dtype), -1)


@keras.saving.register_keras_serializable(package=PACKAGE)
class CapsuleDecoder(keras.layers.Layer):
    """[v (B, J, D), scores (B, J)] -> the reconstruction (B, H, W, C) from the top-scoring capsule.

    `decode` takes capsules already masked: Dense+ReLU per hidden width, Dense(H·W·C)+sigmoid.
    The dense layers are `decoder_dense{k}` (see _weights)."""

    def __init__(self, hidden: list[int], image_shape: list[int], **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.hidden, self.image_shape = [int(x) for x in hidden], [int(x) for x in image_shape]
        widths = [*self.hidden, self.image_shape[0] * self.image_shape[1] * self.image_shape[2]]
        self.dense = [
            keras.layers.Dense(
                width, activation="relu" if k < len(self.hidden) else "sigmoid", name=f"decoder_dense{k}",
                kernel_initializer="zeros",
            )
            for k, width in enumerate(widths)
        ]

    def build(self, input_shapes: Any) -> None:
        v_shape = input_shapes[0]
        width = v_shape[1] * v_shape[2]
        for layer in self.dense:
            layer.build((None, width))
            width = layer.units

    def decode(self, masked: Any) -> Any:
        shape = ops.shape(masked)
        x = ops.reshape(masked, (shape[0], -1))
        for layer in self.dense:
            x = layer(x)
        return ops.reshape(x, (shape[0], *self.image_shape))

    def call(self, inputs: Any) -> Any:
        v, scores = inputs
        return self.decode(mask(v, ops.one_hot(ops.argmax(scores, axis=1), ops.shape(scores)[1])))

    def compute_output_shape(self, input_shapes: Any) -> tuple:
        return (input_shapes[0][0], *self.image_shape)

    def get_config(self) -> dict[str, Any]:
        return {**super().get_config(), "hidden": self.hidden, "image_shape": self.image_shape}


class BatchNorm(keras.layers.BatchNormalization):
    """Keras' batch norm with the spec's constants (capsctl.model.spec.BN_EPS, BN_MOMENTUM), whose batch
    statistics are summed in float64: TensorFlow's float32 reductions over a batch's B·H·W values miss
    the variance by about 1e-4 (measured on 31 digits after the first conv; torch's var_mean stays
    within 1e-7), which is more than the training-step parity with torch and the data-parallel parity
    with one process should absorb.

    In a data-parallel job (`sum_over_ranks` set, a differentiable sum of a tensor over the replicas) the
    batch statistics are the global batch's, as one process computes them; `counts` (a 0/1 scalar, set
    by the step) is 0 on a worker whose only image is the dummy of an empty slice. Two sums, as in the
    torch backend's BatchNorm: the variance is Σ(x − mean)²/n, not E[x²] − mean² (Keras' own
    `synchronized=True`)."""

    sum_over_ranks: Callable[[Any], Any] | None = None
    counts: Any = 1.0

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(momentum=BN_MOMENTUM, epsilon=BN_EPS, **kwargs)

    def _moments(self, inputs: Any, mask: Any) -> tuple[Any, Any]:
        if mask is not None:
            return super()._moments(inputs, mask)
        total_over = self.sum_over_ranks or (lambda t: t)
        axes = self._reduction_axes
        x = ops.cast(inputs, "float64")
        counts = ops.cast(self.counts, "float64")
        n = ops.cast(ops.size(x) // ops.shape(x)[-1], "float64") * counts
        total = total_over(ops.concatenate([ops.sum(x, axis=axes) * counts, ops.reshape(n, (1,))]))
        mean = total[:-1] / total[-1]
        var = total_over(ops.sum(ops.square(x - mean), axis=axes) * counts) / total[-1]
        return ops.cast(mean, inputs.dtype), ops.cast(var, inputs.dtype)


def Trunk(spec: ModelSpec) -> list[keras.layers.Layer]:
    """The conv/pool stack as Keras layers; conv k is named `trunk_conv{k}`, its batch norm `trunk_bn{k}`
    (see _weights)."""
    layers: list[keras.layers.Layer] = []
    k = 0
    for i, layer in enumerate(spec.trunk):
        if isinstance(layer, ConvLayer):
            layers.append(keras.layers.Conv2D(
                layer.filters, layer.kernel, strides=layer.stride, padding=layer.padding, activation="relu",
                name=f"trunk_conv{k}", kernel_initializer="zeros",
            ))
            if layer.batchnorm:  # after the ReLU (Efficient-CapsNet's order)
                layers.append(BatchNorm(name=f"trunk_bn{k}"))
            k += 1
        else:
            layers.append(keras.layers.AveragePooling2D(layer.size, name=f"trunk_pool{i}"))
    return layers


def PoolHead(spec: ModelSpec) -> list[keras.layers.Layer]:
    """Global average pool -> Dense(hidden) ReLU -> Dense(J) sigmoid."""
    return [
        keras.layers.GlobalAveragePooling2D(name="head_gap"),
        keras.layers.Dense(spec.pool.hidden, activation="relu", name="head_dense0",
                           kernel_initializer="zeros"),
        keras.layers.Dense(spec.num_classes, activation="sigmoid", name="head_dense1",
                           kernel_initializer="zeros"),
    ]


def capsule_head(spec: ModelSpec) -> CapsuleHead:
    from dataclasses import asdict

    c = spec.capsule
    return CapsuleHead(
        spec.num_classes, c.dim, c.routings, c.routing, c.squash, c.shared, c.num_inputs,
        with_capsules=spec.decoder is not None, primary=asdict(c.primary) if c.primary else None,
        name="head_capsule",
    )


@contextlib.contextmanager
def keras_defaults() -> Iterator[None]:
    """Keras' defaults while the layers are made, whatever the user's keras.json says: the layers read
    image_data_format, floatx and the dtype policy when constructed, and a .keras file carries only the
    spec, so a `channels_first` config broke the graph (a traceback) and `float16` rounded every weight.
    The user's settings are put back (capsctl_keras.load_model in their program)."""
    fmt, floatx, policy = keras.config.image_data_format(), keras.config.floatx(), keras.config.dtype_policy()
    use_capsctl_defaults()
    try:
        yield
    finally:
        keras.config.set_image_data_format(fmt)
        keras.config.set_floatx(floatx)
        keras.config.set_dtype_policy(policy)


@keras.saving.register_keras_serializable(package=PACKAGE)
class CapsNet(keras.Model):
    """Trunk + head as a functional graph on images (B, H, W, C) of any size -> scores (B, J);
    with a decoder, [scores (B, J), reconstruction (B, H, W, C) from the top-scoring capsule].

    Its config is just the ModelSpec, so a saved `.keras` file rebuilds from the spec alone and
    loads with `safe_mode=True` (no code is deserialised).
    """

    def __init__(self, spec: ModelSpec | dict[str, Any], **kwargs: Any) -> None:
        spec = spec if isinstance(spec, ModelSpec) else ModelSpec.from_dict(spec)
        with keras_defaults():
            self._build_graph(spec, **kwargs)
        self.spec = spec

    def _build_graph(self, spec: ModelSpec, **kwargs: Any) -> None:
        x = inputs = keras.Input(shape=(None, None, spec.in_channels), name="images")
        for layer in Trunk(spec):
            x = layer(x)
        if spec.head == "capsule" and spec.decoder is not None:
            dec = spec.decoder
            assert dec.image_shape is not None  # expected_shapes requires it
            scores, v = capsule_head(spec)(x)
            decoder = CapsuleDecoder(list(dec.hidden), list(dec.image_shape), name="decoder")
            outputs = [scores, decoder([v, scores])]
        elif spec.head == "capsule":
            outputs = capsule_head(spec)(x)
        else:
            for layer in PoolHead(spec):
                x = layer(x)
            outputs = x
        kwargs.setdefault("name", "capsctl")
        super().__init__(inputs=inputs, outputs=outputs, **kwargs)

    def get_config(self) -> dict[str, Any]:
        return {"spec": self.spec.to_dict(), "name": self.name}

    @classmethod
    def from_config(cls, config: dict[str, Any], custom_objects: Any = None) -> CapsNet:
        # (a "format" key, the weight-file contract's version, is read by import and not a layer argument:
        # a later capsctl may add it)
        return cls(**{k: v for k, v in config.items() if k != "format"})


def scores_of(out: Any) -> Any:
    """The scores among a CapsNet's outputs (a decoder model also returns its reconstruction)."""
    return out[0] if isinstance(out, (list, tuple)) else out


def reconstruction_loss(recon: Any, x: Any) -> Any:
    """Σ over pixels of (reconstruction − input)², mean over the batch."""
    d = ops.reshape(recon - x, (ops.shape(x)[0], -1))
    return ops.mean(ops.sum(d * d, axis=1))


def margin_loss(p: Any, y: Any) -> Any:
    per = y * ops.square(ops.relu(0.9 - p)) + 0.25 * (1.0 - y) * ops.square(ops.relu(p - 0.1))
    return ops.mean(ops.mean(per, axis=1))
