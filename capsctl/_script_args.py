"""The arguments the scripts under tools/ share, with one help text each (argparse, not Typer: the scripts
are plain Python files a user runs with `python tools/NAME.py`)."""

from __future__ import annotations

import argparse
from typing import Any


def add_model(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("model", help="a capsctl model file (.safetensors), e.g. RUN/model.safetensors")


def add_data(ap: argparse.ArgumentParser) -> None:
    """--dataset, --data-dir and --image-size, as `capsctl eval` takes them (see `test_images`)."""
    ap.add_argument(
        "--dataset",
        default="mnist-5k",
        help="a data set name or path, as `capsctl train --dataset` (default: mnist-5k)",
    )
    ap.add_argument("--data-dir", help="folder holding the data set's own files (default: the cache)")
    ap.add_argument(
        "--image-size",
        metavar="HxW",
        help="with --dataset PATH: scale the images to fit HxW, as the model trained (train --image-size)",
    )


def test_images(args: argparse.Namespace) -> Any:
    """The test split of the data set the arguments of `add_data` name."""
    from capsctl.data import datasets
    from capsctl.data.sources import parse_image_size

    return datasets.load(args.dataset, args.data_dir, parse_image_size(args.image_size)).test()


def add_backend(ap: argparse.ArgumentParser) -> None:
    ap.add_argument(
        "--backend", default="torch", help="framework to run the model with: torch or keras (default: torch)"
    )


def check_counts(args: argparse.Namespace, *names: str, least: int = 1) -> None:
    """Refuse a count option under `least` in one line (`--rounds 0` was a StatisticsError traceback after
    the work, `--batch-size 0` a loop that never ended)."""
    from capsctl.errors import CapsctlError

    for name in names:
        value = getattr(args, name.replace("-", "_"))
        if value is not None and value < least:
            raise CapsctlError(f"--{name} must be at least {least}, got {value}")


def check_json_out(path: Any) -> None:
    """Refuse a --json path that cannot be written, before the work (a benchmark of an hour found out at its
    end): a folder, a missing folder, or something other than a regular file."""
    import stat
    from pathlib import Path

    from capsctl.errors import CapsctlError

    if path is None:
        return
    p = Path(path)
    if not p.absolute().parent.is_dir():
        raise CapsctlError(f"--json {p}: folder {p.absolute().parent} does not exist")
    if p.exists() and not stat.S_ISREG(p.stat().st_mode):
        raise CapsctlError(f"--json {p}: not a regular file; give the path of a file to write")
