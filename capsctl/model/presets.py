"""Named architectures (`--arch NAME`): each is a ModelSpec; `capsctl train` fills in from the data what
depends on it (input channels, classes, the capsule count of non-shared weights, the decoder's image
shape). Parameter counts below are for 28x28x1 inputs (36x36x1 for efficient-multimnist) and 10 classes
(tests/test_presets.py checks them).

- `seed`: the seed article's trunk (Conv64-Conv64-AvgPool2-Conv128-Conv128, 3x3, ReLU, valid) and its
  shared-weight capsule layer, 10 capsules x 16 dims, `su` routing and squash, 3 iterations; 279,488
  parameters. Any image size.
- `sabour2017` (Sabour, Frosst, Hinton 2017, "Dynamic Routing Between Capsules"): Conv 256 9x9 stride 1
  ReLU; PrimaryCaps: conv 9x9 stride 2 to 32 capsule types x 8 dims (1,152 capsules at 28x28), squashed;
  DigitCaps 10 x 16 with a weight per input-output pair (non-shared, no bias), `sabour` routing and
  squash s·|s|/(1+|s|²), 3 iterations; the reconstruction decoder 512-1024-H·W·C. 8,215,568 parameters
  with the decoder (6,804,224 without), as the paper's architecture: 20,992 (conv) + 5,308,672
  (primary) + 1,474,560 (DigitCaps W) + 1,411,344 (decoder). Its capsule weights fix the image size.
- `efficient` (Mazzia, Salvetti, Chiaberge 2021, "Efficient-CapsNet: capsule network with self-attention
  routing"; the formulas checked against the authors' layers, EscVM/Efficient-CapsNet utils/layers.py):
  Conv 32 5x5, Conv 64 3x3, Conv 64 3x3, Conv 128 3x3 stride 2, each ReLU then batch normalisation
  (28x28 -> 9x9); depthwise primary capsules, 9x9 (one filter per channel, with bias) -> 1x1x128 read
  as 16 capsules x 8 dims, squashed with (1 - e^-|s|)·s/|s|; 10 x 16 output capsules with a weight and a
  log prior b per input-output pair and self-attention routing in one pass: a_ij = Σ_k û_j|i·û_j|k /
  sqrt(16), c_ij = softmax over j of a_ij, s_j = Σ_i (c_ij + b_ij)·û_j|i, v_j = squash(s_j). 162,400
  tensors' values in the file: 161,824 trained (the paper's count) + 576 running statistics of the
  batch norms. No decoder (the paper's reconstruction network is a separate regulariser; add it with
  --decoder). Initial weights are capsctl's Glorot-uniform (the authors use He-normal).
- `efficient-multimnist`: the authors' MultiMNIST graph (EscVM/Efficient-CapsNet
  models/efficient_capsnet_graph_multimnist.py) for 36x36 composites (`--compose overlap`): as
  `efficient`, but the third and fourth convs have stride 2 and the depthwise primary capsules are 5x5
  stride 2 (36x36 -> 6x6 -> 1x1x128 = 16 capsules x 8 dims). 154,656 trained parameters
  (+ 576 running statistics); it needs images of 29x29 to 36x36, so it does not train on 28x28 digits.
  `efficient` trained on 36x36 composites is another network: its 9x9 stride-1 primary capsules give
  400 capsules there and 657,184 parameters.
"""

from __future__ import annotations

from dataclasses import replace

from capsctl.choices import ARCHS
from capsctl.errors import CapsctlError
from capsctl.model.spec import CapsuleSpec, ConvLayer, DecoderSpec, ModelSpec, PrimarySpec


def preset(name: str) -> ModelSpec:
    """The spec of architecture `name` (one of capsctl.choices.ARCHS)."""
    if name == "seed":
        return ModelSpec()
    if name == "sabour2017":
        return ModelSpec(
            trunk=(ConvLayer(256, 9),),
            capsule=CapsuleSpec(
                dim=16, routings=3, routing="sabour", squash="sabour", shared=False,
                primary=PrimarySpec(kind="conv", types=32, dim=8, kernel=9, stride=2),
            ),
            decoder=DecoderSpec(hidden=(512, 1024)),
        )
    if name == "efficient":
        return _efficient(third_stride=1, primary_kernel=9, primary_stride=1)
    if name == "efficient-multimnist":  # (the authors' efficient_capsnet_graph_multimnist.py)
        return _efficient(third_stride=2, primary_kernel=5, primary_stride=2)
    raise CapsctlError(f"--arch must be one of {', '.join(ARCHS)}, got {name!r}")


def _efficient(third_stride: int, primary_kernel: int, primary_stride: int) -> ModelSpec:
    """Efficient-CapsNet: four batch-normed convs (the fourth with stride 2), depthwise primary capsules
    (16 x 8 from 128 channels), self-attention routing; its MNIST and MultiMNIST graphs differ in the
    third conv's stride and the primary capsules' window."""
    return ModelSpec(
        trunk=(
            ConvLayer(32, 5, batchnorm=True),
            ConvLayer(64, 3, batchnorm=True),
            ConvLayer(64, 3, stride=third_stride, batchnorm=True),
            ConvLayer(128, 3, stride=2, batchnorm=True),
        ),
        capsule=CapsuleSpec(
            dim=16, routings=1, routing="attention", squash="efficient", shared=False,
            primary=PrimarySpec(
                kind="depthwise", types=16, dim=8, kernel=primary_kernel, stride=primary_stride
            ),
        ),
    )


# the image size each preset was designed for, where it is not MNIST's 28x28 (MultiMNIST's canvas)
_DESIGN_SIZES = {"efficient-multimnist": (36, 36)}


def design_size(name: str) -> tuple[int, int]:
    """(height, width) of the images preset `name` was designed for: 28x28 digits, or 36x36 composites."""
    return _DESIGN_SIZES.get(name, (28, 28))


def for_images(name: str, height: int | None = None, width: int | None = None) -> ModelSpec:
    """Preset `name` completed for images of this size (default: its design size), as `capsctl train`
    completes it: the input capsule count of non-shared weights, and the decoder's image shape (grey
    images; channels follow the data)."""
    if height is None or width is None:
        height, width = design_size(name)
    spec = preset(name)
    if spec.head == "capsule" and not spec.capsule.shared:
        size = spec.recorded_size(height, width)  # (as capsctl.model.fit.with_training_inputs)
        spec = spec.with_capsule(num_inputs=spec.capsule_count(height, width), image_size=size)
    if spec.decoder is not None:
        spec = spec.replace(decoder=replace(spec.decoder, image_shape=(height, width, spec.in_channels)))
    return spec
