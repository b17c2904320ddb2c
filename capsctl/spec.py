"""The model spec's stable import path (`capsctl.spec`), part of the file-format contract other
people's code reads; the definitions live in `capsctl.model.spec`."""

from capsctl.model.spec import (
    EPS,
    HEADS,
    ROUTINGS,
    SQUASHES,
    AvgPoolLayer,
    CapsuleSpec,
    ConvLayer,
    DecoderSpec,
    ModelSpec,
    PoolSpec,
    TrunkLayer,
    default_spec,
    names_of,
    validate,
)

__all__ = [
    "EPS",
    "HEADS",
    "ROUTINGS",
    "SQUASHES",
    "AvgPoolLayer",
    "CapsuleSpec",
    "ConvLayer",
    "DecoderSpec",
    "ModelSpec",
    "PoolSpec",
    "TrunkLayer",
    "default_spec",
    "names_of",
    "validate",
]
