"""`capsctl data list`, `capsctl data fetch` and `capsctl data forget`."""

from pathlib import Path
from typing import Annotated, Any

import typer

from capsctl.cli._options import Dataset, JsonOpt

app = typer.Typer(help="Find and fetch data sets.", no_args_is_help=True, rich_markup_mode="markdown")


@app.command("list")
def list_datasets(
    data_dir: Annotated[
        Path | None,
        typer.Option(
            help="Also show which data sets this folder would serve, given as --data-dir to train or eval "
            "(the folder of one set's files: the four IDX files, or cifar-10-binary.tar.gz)."
        ),
    ] = None,
    json_out: JsonOpt = False,
) -> None:
    """Show each data set and where it was found (or that it would be downloaded), then the user's image
    folders decoded and cached by earlier runs (`capsctl data forget KEY` removes one).

    Example: capsctl data list --json
    """
    import json

    from capsctl.data import datasets
    from capsctl.errors import CapsctlError

    if data_dir is not None and not data_dir.is_dir():  # (as train and eval refuse it)
        raise CapsctlError(f"--data-dir {data_dir}: no such folder")
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
    from capsctl.data import _folder_cache

    cached = [_cached_row(e) for e in _folder_cache.entries()]
    if json_out:
        typer.echo(json.dumps({"datasets": rows, "user_sets": cached}))
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
    if not cached:
        return
    from rich.markup import escape

    table = Table(title=f"cached user sets ({escape(str(_folder_cache.root()))})")
    table.add_column("key")
    table.add_column("source")
    table.add_column("images (train + test)", justify="right")
    table.add_column("HxWxC")
    table.add_column("on disk", justify="right")
    for c in cached:
        gone = "" if Path(c["source"]).is_dir() else " [yellow](gone)[/]"
        images = f"{c['train_images']:,}" + (f" + {c['test_images']:,}" if c["test_images"] else "")
        table.add_row(
            c["key"],
            escape(c["source"]) + gone,
            images,
            "x".join(map(str, c["shape"])),
            _folder_cache.human_bytes(c["bytes"]),
        )
    out.print(table)


def _cached_row(e: Any) -> dict[str, Any]:
    m = e.manifest
    keys = ("source", "train_images", "test_images", "shape", "image_size", "classes", "created")
    return {"key": e.key, **{k: m.get(k) for k in keys}, "bytes": e.disk_bytes()}


@app.command("fetch")
def fetch(
    dataset: Annotated[Dataset, typer.Argument(help="The data set to fetch.")],
    from_dir: Annotated[
        Path | None, typer.Option("--from", help="Copy from this folder instead of downloading.")
    ] = None,
) -> None:
    """Fill the user cache with a data set: download it (checked against its published digest: SHA-256,
    CIFAR-10's MD5) or copy it from a folder (--from: every file read and checked whole, its image
    counts must be the published set's, so a subset is never cached as the full set, and each file
    must match the published digest: MNIST's and Fashion-MNIST's sums are of the decompressed files,
    so a plain or re-gzipped copy is judged like a download; CIFAR-10's MD5 is of its archive).

    Example: capsctl data fetch fashion-mnist

    Example: capsctl data fetch mnist --from ~/Downloads/mnist
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


@app.command("forget")
def forget(
    what: Annotated[
        str,
        typer.Argument(
            metavar="KEY|PATH",
            help="A cached set's key (or its first 4 or more characters), or its source folder.",
        ),
    ],
) -> None:
    """Remove a user image folder's decoded cache (see `capsctl data list`); the next run decodes it again.

    Example: capsctl data forget ~/photos/pets   (a folder once trained on with --dataset PATH)
    """
    from capsctl.data import _folder_cache

    for e in _folder_cache.forget(what):
        typer.echo(f"forgot {e.key} ({e.source})")
