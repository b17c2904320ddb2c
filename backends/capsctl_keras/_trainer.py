"""One optimiser step at a time, driven by capsctl.training (which owns data, schedule, checkpoints)."""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from capsctl.backend import DigitTargets, OptimConfig
from capsctl.model.spec import ModelSpec, default_recon_weight

from ._env import keras, tf
from ._layers import CapsuleDecoder, margin_loss, mask, reconstruction_loss, safe_norm
from ._runner import batched_scores, build, predict_fn
from ._weights import read, table, variables

# XLA (jit_compile=True) for the train step, measured on this 2-core CPU, capsule head, batch 128:
# 116-131 img/s against 164-182 without, plus 8-10 s of compiling per input shape. Off.
JIT_COMPILE = False


def correct_rows(p: tf.Tensor, y: tf.Tensor) -> tf.Tensor:
    """Per row, whether its k highest scores `p` are exactly its k targets (k = the 1s in `y`): argmax ==
    argmax for a one-hot row (as always), the top-2 set == the label set for a two-hot one (--compose);
    equal scores rank the lower class first, as capsctl.data.composites.set_matches (eval-pairs) does."""
    pos = y > 0.5
    j = tf.range(tf.shape(p)[1])
    pi, pj = p[:, :, None], p[:, None, :]
    above = (pi > pj) | ((pi == pj) & (j[:, None] < j[None, :]))  # class i ranks above class j
    target_over_other = pos[:, :, None] & ~pos[:, None, :]
    sets = tf.reduce_all(above | ~target_over_other, axis=[1, 2])
    k = tf.reduce_sum(tf.cast(pos, tf.int32), 1)
    return tf.where(k == 1, tf.argmax(p, 1) == tf.argmax(y, 1), sets)


def digit_signature(spec: ModelSpec) -> list[tf.TensorSpec]:
    """The input signature of DigitTargets in a compiled step: parts (B, k, H, W, C), part_hot (B, k, J)."""
    return [
        tf.TensorSpec((None, None, None, None, spec.in_channels), tf.float32),
        tf.TensorSpec((None, None, spec.num_classes), tf.float32),
    ]


def digit_constants(digits: DigitTargets) -> tuple[tf.Tensor, tf.Tensor]:
    return (
        tf.constant(np.ascontiguousarray(digits.images, dtype=np.float32)),
        tf.constant(np.ascontiguousarray(digits.onehots, dtype=np.float32)),
    )


class TorchStyleAdamW(keras.optimizers.AdamW):
    """Keras' AdamW with epsilon where torch (and the Adam paper's Algorithm 1) puts it.

    Keras adds epsilon to sqrt(v) before the bias correction ("epsilon hat"), torch after it: at
    step t Keras' effective epsilon is eps/sqrt(1 - beta2^t), 32x larger at step 1. With eps=1e-7
    that is not negligible here: about 30% of the first step's gradients are below 1e-5 and moved
    up to 70% less than in torch (measured). With epsilon moved, both backends take the
    same steps from the same checkpoint, up to float rounding. Decoupled decay is Keras' own
    (variable -= variable * wd * lr before the Adam step), which is exactly torch's AdamW.
    """

    def update_step(self, gradient, variable, learning_rate):
        ops = keras.ops
        dtype = variable.dtype
        lr = ops.cast(learning_rate, dtype)
        gradient = ops.cast(gradient, dtype)
        # the constants and bias corrections in float64, cast once, as torch computes them in Python: in
        # float32, 1 - beta2 is 0.99999e-3, and v drifted 1.3e-5 from torch's on every step
        t = ops.cast(self.iterations + 1, "float64")
        b1, b2 = ops.cast(self.beta_1, "float64"), ops.cast(self.beta_2, "float64")
        one_b1, one_b2 = ops.cast(1.0 - self.beta_1, dtype), ops.cast(1.0 - self.beta_2, dtype)
        correct1 = ops.cast(1.0 - ops.power(b1, t), dtype)
        correct2 = ops.cast(ops.sqrt(1.0 - ops.power(b2, t)), dtype)
        m = self._momentums[self._get_variable_index(variable)]
        v = self._velocities[self._get_variable_index(variable)]
        self.assign_add(m, ops.multiply(ops.subtract(gradient, m), one_b1))
        self.assign_add(v, ops.multiply(ops.subtract(ops.square(gradient), v), one_b2))
        denom = ops.add(ops.divide(ops.sqrt(v), correct2), self.epsilon)
        self.assign_sub(variable, ops.divide(ops.multiply(m, lr / correct1), denom))


class KerasTrainer:
    def __init__(self, spec: ModelSpec, weights: Mapping[str, np.ndarray], optim: OptimConfig) -> None:
        self.spec = spec
        self.model = build(spec, weights)
        self.vars = variables(self.model)
        self.opt = TorchStyleAdamW(
            learning_rate=1e-3, weight_decay=optim.weight_decay, beta_1=optim.beta1, beta_2=optim.beta2,
            epsilon=optim.eps,
        )
        self.trainable = list(self.model.trainable_variables)
        self.opt.build(self.trainable)  # create the slots now, outside the compiled step
        self._predict = predict_fn(self.model)
        self.recon_weight = default_recon_weight(spec) if optim.recon_weight is None else optim.recon_weight
        if spec.decoder is not None:  # the trunk + head's capsules, and the decoder, sharing the variables
            head = self.model.get_layer("head_capsule")
            self._capsules = keras.Model(self.model.inputs, head.output[1])
            decoder = self.model.get_layer("decoder")
            assert isinstance(decoder, CapsuleDecoder)
            self._decoder = decoder
        sig = [
            tf.TensorSpec((None, None, None, spec.in_channels), tf.float32),
            tf.TensorSpec((None, spec.num_classes), tf.float32),
            tf.TensorSpec((), tf.float32),
        ]
        self._step = tf.function(self._train_step, input_signature=sig, jit_compile=JIT_COMPILE)
        # (a second graph, traced only when a step brings DigitTargets: --compose with a decoder)
        self._step_digits = tf.function(
            self._train_step, input_signature=[*sig, *digit_signature(spec)], jit_compile=JIT_COMPILE
        )

    def _train_step(
        self, x: tf.Tensor, y: tf.Tensor, lr: tf.Tensor, parts: tf.Tensor | None = None,
        part_hot: tf.Tensor | None = None,
    ) -> tuple[tf.Tensor, tf.Tensor]:
        self.opt.learning_rate.assign(lr)
        loss, p = self.descend(x, y, tf.constant(1.0), parts, part_hot)
        correct = tf.reduce_sum(tf.cast(correct_rows(p, y), tf.int32))
        return loss, correct

    def descend(
        self, x: tf.Tensor, y: tf.Tensor, weight: tf.Tensor, parts: tf.Tensor | None = None,
        part_hot: tf.Tensor | None = None,
    ) -> tuple[tf.Tensor, tf.Tensor]:
        """One optimiser step on `weight` × the batch's mean loss; (mean loss, class scores). Under a
        tf.distribute strategy the optimiser sums the replicas' gradients (Keras' TF optimiser)."""
        with tf.GradientTape() as tape:
            loss, p = self.loss(x, y, parts, part_hot)
            weighted = loss * weight
        grads = tape.gradient(weighted, self.trainable)
        self.opt.apply_gradients(zip(grads, self.trainable, strict=True))
        return loss, p

    def loss(
        self, x: tf.Tensor, y: tf.Tensor, parts: tf.Tensor | None = None, part_hot: tf.Tensor | None = None
    ) -> tuple[tf.Tensor, tf.Tensor]:
        """(mean loss over the batch, class scores): the forward pass a step differentiates. `parts`
        (B, k, H, W, C) and `part_hot` (B, k, J): the digits of a composite, each redrawn apart."""
        if self.spec.decoder is None:
            p = self.model(x, training=True)
            return margin_loss(p, y), p
        v = self._capsules(x, training=True)
        p = safe_norm(v)
        if parts is None or part_hot is None:  # the reconstruction is drawn from the true class's capsule
            recon = self._decoder.decode(mask(v, y))
            return margin_loss(p, y) + self.recon_weight * reconstruction_loss(recon, x), p
        # each digit from its own capsule alone, against that digit alone (Sabour et al.'s MultiMNIST):
        # the k masked copies of v go through the decoder as one batch
        shape = tf.shape(part_hot)
        masked = v[:, None] * part_hot[..., None]  # (B, k, J, D)
        recon = self._decoder.decode(tf.reshape(masked, (shape[0] * shape[1], *v.shape[1:])))
        flat = (shape[0], -1)  # Σ over k and pixels
        redraw = reconstruction_loss(tf.reshape(recon, flat), tf.reshape(parts, flat))
        return margin_loss(p, y) + self.recon_weight * redraw, p

    def step(
        self, x: np.ndarray, y_onehot: np.ndarray, lr: float, digits: DigitTargets | None = None
    ) -> tuple[float, int]:
        args = [
            tf.constant(np.ascontiguousarray(x, dtype=np.float32)),
            tf.constant(np.ascontiguousarray(y_onehot, dtype=np.float32)),
            tf.constant(lr, tf.float32),
        ]
        if digits is None:
            loss, correct = self._step(*args)
        else:
            loss, correct = self._step_digits(*args, *digit_constants(digits))
        return float(loss), int(correct)

    def scores(self, images: np.ndarray, batch_size: int = 512) -> np.ndarray:
        return batched_scores(self._predict, images, batch_size, self.spec.num_classes)

    def weights(self) -> dict[str, np.ndarray]:
        return read(self.spec, self.model)

    # -- optimiser slots, keyed like the torch trainer's so checkpoints move between backends ----
    def _slots(self, native: str) -> tuple[object, object]:
        var = self.vars[native]
        # Keras 3 keeps Adam's slots in lists aligned with the built variable list
        i = self.opt._get_variable_index(var)
        return self.opt._momentums[i], self.opt._velocities[i]

    def optimizer_state(self) -> dict[str, np.ndarray]:
        step = int(self.opt.iterations.numpy())
        if step == 0:
            return {}
        out: dict[str, np.ndarray] = {}
        for name, (native, _perm) in table(self.spec, trained_only=True).items():
            m, v = self._slots(native)
            out[f"m.{name}"] = np.asarray(m.numpy(), np.float32)  # type: ignore[attr-defined]
            out[f"v.{name}"] = np.asarray(v.numpy(), np.float32)  # type: ignore[attr-defined]
        out["step"] = np.array([float(step)], np.float64)
        return out

    def load_optimizer_state(self, state: Mapping[str, np.ndarray]) -> None:
        for name, (native, _perm) in table(self.spec, trained_only=True).items():  # identity permutations
            m, v = self._slots(native)
            m.assign(state[f"m.{name}"])  # type: ignore[attr-defined]
            v.assign(state[f"v.{name}"])  # type: ignore[attr-defined]
        self.opt.iterations.assign(int(state["step"][0]))
