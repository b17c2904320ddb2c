"""Reading a file the user named: every OS failure becomes one CapsctlError naming the file."""

from __future__ import annotations

import os
from pathlib import Path

from .errors import CapsctlError


def read_user_file(path: str | os.PathLike[str], expected: str, limit: int | None = None) -> bytes:
    """The file's bytes (only the first `limit` if given); `expected` says what it should be,
    e.g. "a .safetensors file", for the message when a folder is given instead."""
    p = Path(path)
    try:
        if p.is_dir():
            raise CapsctlError(f"{p}: is a folder, expected {expected}")
        with open(p, "rb") as f:
            return f.read() if limit is None else f.read(limit)
    except FileNotFoundError:
        raise CapsctlError(f"{p}: no such file") from None
    except PermissionError:
        raise CapsctlError(f"{p}: permission denied") from None
    except OSError as e:
        raise CapsctlError(f"{p}: cannot read ({e.strerror or e})") from None
