"""Data-parallel training on Keras/TensorFlow (tf.distribute.MultiWorkerMirroredStrategy from TF_CONFIG):
not supported yet; the torch backend has it (docs/DISTRIBUTED.md)."""

from __future__ import annotations

from capsctl.errors import CapsctlError
from capsctl.training.distributed import World

_NOT_YET = "distributed training is not supported yet on keras; use --backend torch (docs/DISTRIBUTED.md)"


def join() -> World:
    raise CapsctlError(_NOT_YET)


def launch(nproc: int, argv: list[str], port: int | None) -> dict[int, int]:
    raise CapsctlError(_NOT_YET)
