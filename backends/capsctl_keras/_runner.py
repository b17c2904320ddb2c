"""Inference: class scores in batches through one compiled function, and the routing trace."""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from capsctl.model.reference import RoutingTrace
from capsctl.model.spec import ModelSpec

from ._env import keras, tf
from ._layers import CapsNet, CapsuleDecoder, CapsuleHead, mask, scores_of
from ._weights import assign


def build(spec: ModelSpec, weights: Mapping[str, np.ndarray]) -> CapsNet:
    model = CapsNet(spec)
    assign(spec, model, weights)
    return model


def predict_fn(model: CapsNet) -> tf.types.experimental.PolymorphicFunction:
    """model(x) as a tf.function over any batch and image size (one trace, no per-shape retracing).

    Not jit_compiled: XLA compiles once per distinct input shape, and eval feeds several (the last
    partial batch, 28x28 and 56x28 images); graph mode alone removes the Python overhead."""
    sig = [tf.TensorSpec((None, None, None, model.spec.in_channels), tf.float32)]
    return tf.function(lambda x: scores_of(model(x, training=False)), input_signature=sig)


def batched_scores(fn: tf.types.experimental.PolymorphicFunction, images: np.ndarray, batch_size: int,
                   num_classes: int) -> np.ndarray:
    out = [
        fn(tf.constant(np.ascontiguousarray(images[start : start + batch_size], dtype=np.float32))).numpy()
        for start in range(0, len(images), batch_size)
    ]
    if not out:
        return np.zeros((0, num_classes), np.float32)
    return np.concatenate(out)


class KerasRunner:
    def __init__(self, spec: ModelSpec, weights: Mapping[str, np.ndarray]) -> None:
        self.spec = spec
        self.model = build(spec, weights)
        self._predict = predict_fn(self.model)

    def scores(self, images: np.ndarray, batch_size: int = 512) -> np.ndarray:
        return batched_scores(self._predict, images, batch_size, self.spec.num_classes)

    def trace(self, images: np.ndarray, routings: int | None = None) -> tuple[np.ndarray, RoutingTrace]:
        head = self.model.get_layer("head_capsule") if self.spec.head == "capsule" else None
        if not isinstance(head, CapsuleHead):
            raise ValueError("the pooling head has no routing to trace")
        features = keras.Model(self.model.inputs, head.input)  # the trunk, sharing the variables
        f = features(tf.constant(np.ascontiguousarray(images, dtype=np.float32)), training=False)
        lengths, cs, ags = head.trace(f, routings)
        return np.asarray(lengths), RoutingTrace(np.asarray(cs), np.asarray(ags))

    def _head(self) -> tuple[keras.Model, CapsuleHead]:
        head = self.model.get_layer("head_capsule") if self.spec.head == "capsule" else None
        if not isinstance(head, CapsuleHead):
            raise ValueError("the pooling head has no capsules")
        return keras.Model(self.model.inputs, head.input), head  # the trunk, sharing the variables

    def _decoder(self) -> CapsuleDecoder:
        if self.spec.decoder is None:
            raise ValueError("this model has no decoder")
        decoder = self.model.get_layer("decoder")
        assert isinstance(decoder, CapsuleDecoder)
        return decoder

    def capsules(self, images: np.ndarray) -> np.ndarray:
        features, head = self._head()
        f = features(tf.constant(np.ascontiguousarray(images, dtype=np.float32)), training=False)
        return np.asarray(head.capsules(f))

    def decode(self, masked: np.ndarray) -> np.ndarray:
        return np.asarray(self._decoder().decode(tf.constant(np.ascontiguousarray(masked, dtype=np.float32))))

    def reconstruct(self, images: np.ndarray, classes: np.ndarray) -> np.ndarray:
        decoder = self._decoder()
        v = tf.constant(self.capsules(images))
        onehot = tf.one_hot(np.asarray(classes, np.int64), self.spec.num_classes, dtype=tf.float32)
        return np.asarray(decoder.decode(mask(v, onehot)))
