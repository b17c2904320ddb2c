"""The weight file's stable import path (`capsctl.weights`), part of the file-format contract other
people's code reads; the definitions live in `capsctl.model.weights`."""

from capsctl.model.weights import (
    CHECKPOINT_FORMAT,
    MODEL_FORMAT,
    Weights,
    check_weights,
    expected_shapes,
    init_weights,
    load_model,
    parameter_count,
    read_safetensors,
    save_model,
)

__all__ = [
    "CHECKPOINT_FORMAT",
    "MODEL_FORMAT",
    "Weights",
    "check_weights",
    "expected_shapes",
    "init_weights",
    "load_model",
    "parameter_count",
    "read_safetensors",
    "save_model",
]
