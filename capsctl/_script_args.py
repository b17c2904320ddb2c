"""The arguments the scripts under tools/ share, with one help text each (argparse, not Typer: the scripts
are plain Python files a user runs with `python tools/NAME.py`)."""

from __future__ import annotations

import argparse


def add_model(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("model", help="a capsctl model file (.safetensors), e.g. RUN/model.safetensors")


def add_data(ap: argparse.ArgumentParser) -> None:
    """--dataset and --data-dir, as `capsctl eval` takes them."""
    ap.add_argument(
        "--dataset",
        default="mnist-5k",
        help="a data set name or path, as `capsctl train --dataset` (default: mnist-5k)",
    )
    ap.add_argument("--data-dir", help="folder holding the data set's own files (default: the cache)")


def add_backend(ap: argparse.ArgumentParser) -> None:
    ap.add_argument(
        "--backend", default="torch", help="framework to run the model with: torch or keras (default: torch)"
    )
