"""`capsctl data list` and `capsctl data fetch`."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from capsctl.cli._options import DataDirOpt

app = typer.Typer(help="Find and fetch data sets.", no_args_is_help=True)


@app.command("list")
def list_datasets(data_dir: DataDirOpt = None) -> None:
    """Show each data set and where it was found (or that it would be downloaded)."""
    from rich.table import Table

    from capsctl._console import out
    from capsctl.data import datasets

    table = Table(title="data sets")
    table.add_column("name")
    table.add_column("found in")
    table.add_column("folder")
    for name in datasets.DATASETS:
        found = next(
            (c for c in datasets.candidates(name, data_dir) if c.folder is not None and datasets.is_complete(c.folder)),
            None,
        )
        if found is not None:
            table.add_row(name, found.label, str(found.folder))
        else:
            info = datasets.DATASETS[name]
            table.add_row(name, "[yellow]not found[/]", f"downloads on first use ({len(info.mirrors)} mirrors) {info.note}")
    out.print(table)


@app.command("fetch")
def fetch(
    name: Annotated[str, typer.Argument(help="mnist or fashion-mnist.")],
    from_dir: Annotated[Path | None, typer.Option("--from", help="Copy from this folder instead of downloading.")] = None,
) -> None:
    """Fill the user cache with a data set: download it (SHA-256 checked) or copy it from a folder."""
    from capsctl.data import datasets

    info = datasets.get_info(name)
    dest = datasets.cache_root() / name
    if from_dir is not None:
        datasets.copy_from(info, from_dir, dest)
    elif not datasets.is_complete(dest):
        datasets.fetch(info, dest)
    typer.echo(f"{name}: {dest}")
