"""`capsctl data list` and `capsctl data fetch`."""

from pathlib import Path
from typing import Annotated, Any

import typer

from capsctl.cli._options import DataDirOpt, Dataset, JsonOpt

app = typer.Typer(help="Find and fetch data sets.", no_args_is_help=True, rich_markup_mode="markdown")


@app.command("list")
def list_datasets(data_dir: DataDirOpt = None, json_out: JsonOpt = False) -> None:
    """Show each data set and where it was found (or that it would be downloaded).

    Example: capsctl data list --data-dir ../shared/data --json
    """
    import json

    from capsctl.data import datasets

    rows: list[dict[str, Any]] = []
    for name, info in datasets.DATASETS.items():
        found = next(
            (
                c
                for c in datasets.candidates(name, data_dir)
                if c.folder is not None and datasets.has_files(info, c.folder)
            ),
            None,
        )
        rows.append(
            {
                "name": name,
                "found": found is not None,
                "found_in": found.label if found else None,
                "folder": str(found.folder) if found else None,
                "mirrors": len(info.mirrors),
                "note": info.note,
            }
        )
    if json_out:
        typer.echo(json.dumps({"datasets": rows}))
        return
    from rich.table import Table

    from capsctl._console import out

    table = Table(title="data sets")
    table.add_column("name")
    table.add_column("found in")
    table.add_column("folder")
    for r in rows:
        if r["found"]:
            table.add_row(r["name"], r["found_in"], r["folder"])
        else:
            table.add_row(
                r["name"],
                "[yellow]not found[/]",
                f"downloads on first use ({r['mirrors']} mirrors) {r['note']}",
            )
    out.print(table)


@app.command("fetch")
def fetch(
    dataset: Annotated[Dataset, typer.Argument(help="The data set to fetch.")],
    from_dir: Annotated[
        Path | None, typer.Option("--from", help="Copy from this folder instead of downloading.")
    ] = None,
) -> None:
    """Fill the user cache with a data set: download it (SHA-256 checked) or copy it from a folder.

    Example: capsctl data fetch mnist --from ../shared/data/mnist-5k
    """
    from capsctl.data import datasets

    name = str(dataset)
    info = datasets.get_info(name)
    if info.embedded:
        typer.echo(f"{name}: {datasets.verify_embedded(info)} (embedded in capsctl; nothing to fetch)")
        return
    dest = datasets.cache_root() / name
    if from_dir is not None:
        datasets.copy_from(info, from_dir, dest)
    elif not datasets.has_files(info, dest):
        datasets.fetch(info, dest)
    typer.echo(f"{name}: {dest}")
