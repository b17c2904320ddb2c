"""One Rich console on stderr for progress and messages; stdout stays for results (tables, JSON)."""

from __future__ import annotations

import os
import sys

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

# Written to a file or a pipe (no terminal, no COLUMNS), Rich lays its tables out for 80 columns and cuts
# their cells ("279,4…"): results are laid out for a wide page there instead
PIPE_WIDTH = 200
# a closed stdout or stderr (`capsctl ... >&-`): Python sets it to None, and this module's isatty (so every
# command, even --help) raised an AttributeError traceback; what would be written there goes nowhere
for _stream in ("stdout", "stderr"):
    if getattr(sys, _stream) is None:
        setattr(sys, _stream, open(os.devnull, "w"))  # noqa: SIM115 (open for the life of the process)
err = Console(stderr=True)
out = Console(width=None if sys.stdout.isatty() or "COLUMNS" in os.environ else PIPE_WIDTH)

# set by a command's -q (and by every rank but 0 of a job): progress drawn deep inside, such as an image
# folder's first decoding, then stays quiet too, without a flag passed through every loader
_quiet = False


def shown(path: str) -> str:
    """A path as text any terminal, CSV reader or figure takes: bytes of a file name that are not UTF-8
    (held as surrogates, as the OS gave them) shown as \\xNN (printed as they are, they raised
    UnicodeEncodeError on a strict UTF-8 stream, and matplotlib refused them)."""
    try:
        return os.fsencode(path).decode("utf-8", "backslashreplace")
    except UnicodeError:
        return path.encode("utf-8", "backslashreplace").decode("utf-8")


def set_quiet(flag: bool) -> None:
    global _quiet
    _quiet = flag


def quiet() -> bool:
    return _quiet


def progress(*extra: TextColumn) -> Progress:
    """A progress bar in the house style; `extra` columns show live fields such as loss."""
    return Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        *extra,
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        console=err,
        transient=False,
    )
