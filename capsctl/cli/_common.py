"""Options shared by several commands (Annotated aliases), so they read and behave alike."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

BackendOpt = Annotated[str, typer.Option("--backend", "-b", help="Framework that runs the model: torch or keras.")]
DatasetOpt = Annotated[str, typer.Option(help="Data set: mnist or fashion-mnist.")]
DataDirOpt = Annotated[
    Path | None,
    typer.Option(help="Folder holding the four IDX files (else: $CAPSCTL_DATA_DIR, the cache, system package, download)."),
]
ModelArg = Annotated[Path, typer.Argument(help="A capsctl model file (.safetensors), e.g. RUN/model.safetensors.")]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print one JSON object instead of a table.")]
LimitOpt = Annotated[int | None, typer.Option(help="Use only the first N images / composites.")]
BatchOpt = Annotated[int, typer.Option(help="Images per forward pass.")]


def check_range(name: str, value: float | int | None, lo: float | None = None, hi: float | None = None) -> None:
    from ..errors import CapsctlError

    if value is None:
        return
    if (lo is not None and value < lo) or (hi is not None and value > hi):
        bounds = f"{lo if lo is not None else '-inf'}..{hi if hi is not None else 'inf'}"
        raise CapsctlError(f"{name} must be in {bounds}, got {value}")
