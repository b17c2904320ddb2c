"""Floating-point operations of one image's forward pass, counted from a ModelSpec.

Backend-neutral and exact for the formulas we count; a multiply-add is 2 FLOPs. What is
counted (per image, forward):
- conv layer: 2·k·k·Cin·Cout·H'·W' (H', W' the output size; bias, ReLU and average pooling are
  not counted: they are memory-bound and < 1% of the total);
- primary capsules (if any): their convolution, as a conv layer (the squash is not counted);
- capsule predictions û = u·W: 2·N·C·J·D;
- each routing iteration r = 1..R: softmax over the J outputs 3·J·N (exp, sum, divide),
  s = Σ_i c_ij û_j|i 2·J·N·D, squash 3·J·D (‖s‖² then scale), and for r < R the agreement
  û·v 2·J·N·D (`sabour` adds J·N for accumulating the logits; `su-unit` scales s to unit length,
  3·J·D, and squashes only after the last iteration); then the scores ‖v_j‖ 2·J·D;
- pool head: the two dense layers 2·C·hidden + 2·hidden·J;
- reconstruction decoder (spec.decoder set): its dense layers on the J·D masked capsules,
  2·in·out each (J·D -> hidden... -> H·W·C; the masked capsules are multiplied in full, as the
  layers do; mask, ReLU, sigmoid and the loss are not counted). It runs in training (and for
  reconstructions), not for class scores: `head` leaves it out, `forward` and `train_step` count it.

A training step is counted as 3 × forward (backward ≈ 2 × forward: gradients of inputs and of
weights), the usual convention; the optimiser update is not counted.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

from capsctl.model.spec import ConvLayer, ModelSpec

TRAIN_FACTOR = 3


@dataclass(frozen=True)
class Flops:
    convs: tuple[int, ...]  # per conv layer, in trunk order
    predictions: int  # capsule û (0 for the pool head)
    routing: int  # all routing iterations plus the output norms (0 for the pool head)
    dense: int  # pool head dense layers (0 for the capsule head)
    decoder: int = 0  # reconstruction decoder's dense layers (0 without a decoder)
    primary: int = 0  # the primary capsules' convolution (0 without one)

    @property
    def trunk(self) -> int:
        return sum(self.convs)

    @property
    def head(self) -> int:
        return self.primary + self.predictions + self.routing + self.dense

    @property
    def forward(self) -> int:
        """The training forward pass: trunk, head and (if any) decoder."""
        return self.trunk + self.head + self.decoder

    @property
    def train_step(self) -> int:
        """Nominal FLOPs of one training step per image (forward + backward)."""
        return TRAIN_FACTOR * self.forward


def routing_flops(spec: ModelSpec, n: int) -> int:
    """FLOPs of R routing iterations over N input capsules, plus the output capsule norms; attention
    routing is one pass, whatever capsule.routings says (capsctl.model.reference.route_attention)."""
    caps = spec.capsule
    j, d, r_total = spec.num_classes, caps.dim, caps.routings
    if caps.routing == "attention":
        # Σ_k û_j|k (JND), a = û·Σ (2JND) / sqrt(D) (JN), softmax over j (3JN), c + b (JN),
        # s = Σ_i (c + b) û (2JND), squash (3JD), scores (2JD)
        return 5 * j * n * d + 5 * j * n + 5 * j * d
    total = 0
    for r in range(1, r_total + 1):
        total += 3 * j * n  # softmax over j
        total += 2 * j * n * d  # s_j = Σ_i c_ij û_j|i
        if caps.routing == "su-unit":
            if r < r_total:
                total += 3 * j * d + 2 * j * n * d  # s/‖s‖, then û·(s/‖s‖)
            else:
                total += 3 * j * d  # squash only after the last iteration
        else:
            total += 3 * j * d  # squash
            if r < r_total:
                total += 2 * j * n * d  # agreement û·v
                if caps.routing == "sabour":
                    total += j * n  # b += agreement
    return total + 2 * j * d  # scores ‖v_j‖


def decoder_flops(spec: ModelSpec, height: int, width: int) -> int:
    """FLOPs of the decoder's dense layers (0 without one): J·D -> hidden... -> H·W·C, 2·in·out each.
    H, W, C: decoder.image_shape, else the image size counted at with in_channels."""
    dec = spec.decoder
    if dec is None:
        return 0
    h, w, c = dec.image_shape or (height, width, spec.in_channels)
    widths = [spec.num_classes * spec.capsule.dim, *dec.hidden, h * w * c]
    return sum(2 * a * b for a, b in itertools.pairwise(widths))


def count(spec: ModelSpec, height: int = 28, width: int = 28) -> Flops:
    """FLOPs of one image's forward pass at this image size."""
    spec.trunk_grid(height, width)  # raises a clear error if the image is too small
    h, w, cin = height, width, spec.in_channels
    convs = []
    for layer in spec.trunk:
        if isinstance(layer, ConvLayer):
            h, w = layer.out_size(h), layer.out_size(w)
            convs.append(2 * layer.kernel * layer.kernel * cin * layer.filters * h * w)
            cin = layer.filters
        else:
            h, w = h // layer.size, w // layer.size
    c, j = spec.trunk_channels, spec.num_classes
    if spec.head == "capsule":
        p = spec.capsule.primary
        primary = 0
        if p is not None:
            ph, pw = p.out_size(h), p.out_size(w)
            out = 1 if p.kind == "depthwise" else p.types * p.dim  # depthwise: one filter per channel
            primary = 2 * p.kernel * p.kernel * c * out * ph * pw
        n, c = spec.capsule_count(height, width), spec.capsule_input_dim
        pred = 2 * n * c * j * spec.capsule.dim
        routing = routing_flops(spec, n)
        return Flops(tuple(convs), pred, routing, 0, decoder_flops(spec, height, width), primary)
    hidden = spec.pool.hidden
    return Flops(tuple(convs), 0, 0, 2 * c * hidden + 2 * hidden * j)
