"""The names of the fixed choices that the library checks and the command line offers.

Each tuple here (and the recipes and schedules of `capsctl.training.recipes`) is the one definition;
the modules that check a choice import it from here (`capsctl.model.spec.HEADS` is this HEADS). This
module imports nothing, so the command line builds its option Enums from it and `capsctl --help` stays
fast (no numpy, no dataclasses to build)."""

from __future__ import annotations

# named architectures (capsctl.model.presets): the seed article's, Sabour et al. 2017's, Mazzia et al. 2021's
# for MNIST and for MultiMNIST's 36x36 composites
ARCHS = ("seed", "sabour2017", "efficient", "efficient-multimnist")
HEADS = ("capsule", "pool")  # capsule: dynamic routing; pool: global average pooling
ROUTINGS = ("su", "sabour", "su-unit", "attention")  # attention: Efficient-CapsNet's, not iterative
SQUASHES = ("su", "sabour", "efficient")
# what `experiment ablate` compares by default: the dynamic routings and their squashes, each of which
# runs on the seed's shared-weight layer (attention needs a weight per input: --arch efficient)
ABLATE_ROUTINGS = ("su", "sabour", "su-unit")
ABLATE_SQUASHES = ("su", "sabour")
PRIMARY_KINDS = ("conv", "depthwise")  # how primary capsules are made from the trunk's output
LAYOUTS = ("vertical", "horizontal", "overlap")  # how the digits of a composite are placed
COMPOSE = ("overlap",)  # what `capsctl train --compose` trains on: composites of two training digits
DIRECTIONS = ("auto", "top-to-bottom", "left-to-right")  # reading order of the classes `inspect` finds
WEIGHTINGS = ("contribution", "coupling", "raw")  # what `inspect` weighs a class's routing evidence by
INVERT_CHOICES = ("auto", "yes", "no")  # whether an image's light background is inverted
EXPORT_FORMATS = ("torch", "keras", "onnx")  # framework-native files `capsctl export` writes
# what `capsctl experiment` scores: composite test name -> (layout, digits); "test" is the standard test set
COMPOSITE_TESTS: dict[str, tuple[str, int]] = {
    "vertical": ("vertical", 2),
    "horizontal": ("horizontal", 2),
    "vertical3": ("vertical", 3),
    "overlap": ("overlap", 2),
}
ALL_TESTS = ("test", *COMPOSITE_TESTS)
# The data sets of capsctl.data.datasets.DATASETS and the backends of capsctl.backend.BUILTIN, by name
# (those modules import numpy; tests/test_cli_options.py checks that the names agree).
DATASETS = ("mnist-5k", "mnist", "fashion-mnist", "cifar10")
BUILTIN_BACKENDS = ("torch", "keras")
