"""Whether this process is a rank of a distributed job, from its launcher's environment alone: the CLI
asks before anything is imported (capsctl.training.distributed pulls in numpy and the spec)."""

from __future__ import annotations

import os

# the variables each backend's launcher sets in its ranks (torchrun's; TF's TF_CONFIG)
LAUNCHER_ENV = {"torch": ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"), "keras": ("TF_CONFIG",)}


def launched(backend: str | None = None) -> bool:
    """Whether this process was started as one rank of a job by `backend`'s launcher (any, if None)."""
    kinds = LAUNCHER_ENV.values() if backend is None else [LAUNCHER_ENV.get(backend, ())]
    return any(names and all(name in os.environ for name in names) for names in kinds)
