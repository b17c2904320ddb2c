"""Options shared by several commands (Annotated aliases), so they read and behave alike."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Annotated

import typer

from capsctl.errors import CapsctlError

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
    from capsctl.errors import CapsctlError

    if value is None:
        return
    if (lo is not None and value < lo) or (hi is not None and value > hi):
        bounds = f"{lo if lo is not None else '-inf'}..{hi if hi is not None else 'inf'}"
        raise CapsctlError(f"{name} must be in {bounds}, got {value}")


def parse_ints(text: str, option: str, lo: int = 0, hi: int = 1 << 30) -> list[int]:
    """'0,1,2' -> [0, 1, 2]; also accepts ranges like '1-8'."""
    values: list[int] = []
    for part in (p.strip() for p in text.split(",")):
        if not part:
            continue
        try:
            if "-" in part[1:]:
                a, b = part.split("-", 1)
                values.extend(range(int(a), int(b) + 1))
            else:
                values.append(int(part))
        except ValueError:
            raise CapsctlError(f"{option}: expected comma-separated integers, got {text!r}") from None
    if not values:
        raise CapsctlError(f"{option}: no values given")
    for v in values:
        if not lo <= v <= hi:
            raise CapsctlError(f"{option}: {v} is outside {lo}..{hi}")
    return list(dict.fromkeys(values))


def parse_names(text: str, option: str, allowed: Sequence[str]) -> list[str]:
    names = [p.strip() for p in text.split(",") if p.strip()]
    if not names:
        raise CapsctlError(f"{option}: no values given")
    for n in names:
        if n not in allowed:
            raise CapsctlError(f"{option}: unknown value {n!r} (known: {', '.join(allowed)})")
    return list(dict.fromkeys(names))
