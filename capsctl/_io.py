"""Files on disk: reading a file the user named (every OS failure becomes one CapsctlError naming
the file) and writing one atomically (readers see the old content or the new, never half of either)."""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

from capsctl.errors import CapsctlError


def resolved(path: str | os.PathLike[str], what: str) -> Path:
    """`path` made absolute with its symbolic links followed; a link loop is one CapsctlError naming
    `what` (the option or argument), not the RuntimeError that Python 3.11's Path.resolve raises."""
    try:
        return Path(path).expanduser().resolve()
    except (RuntimeError, OSError) as e:
        raise CapsctlError(f"{what} {path}: cannot follow its symbolic links ({e})") from None


def atomic_write_bytes(path: str | os.PathLike[str], data: bytes) -> None:
    """Write `data` to a temporary sibling, fsync it, rename it over `path`, fsync the folder.

    A symbolic link at `path` is written through (the file it points to gets the data; the rename had
    replaced the link with a plain file), and anything at `path` that is not a regular file (a device, a
    pipe: `--out /dev/null` replaced the device node for the whole machine) is refused."""
    import stat

    path = Path(path)
    if path.is_symlink():
        path = Path(os.path.realpath(path))
    try:
        mode = os.stat(path).st_mode
    except OSError:
        mode = None  # (nothing there yet, or not reachable: the write says why)
    if mode is not None and not stat.S_ISREG(mode):
        kind = "a folder" if stat.S_ISDIR(mode) else "a device, pipe or socket"
        raise CapsctlError(f"{path}: {kind}, not a regular file; give the path of a file to write")
    tmp = path.with_name(_temporary_name(path.name))
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        with contextlib.suppress(OSError):
            tmp.unlink()
        if isinstance(e, OSError) and e.errno is not None:
            # name the file the user knows, not our temporary (a failed write() names none at all)
            raise OSError(e.errno, f"{e.strerror or e}; the file on disk is unchanged", str(path)) from e
        raise
    fsync_dir(path.parent)


def _temporary_name(name: str) -> str:
    """`.NAME.tmp-PID`, or, for a NAME near the file system's 255-byte limit (which NAME itself may
    reach), a short name made from a digest of NAME."""
    tmp = f".{name}.tmp-{os.getpid()}"
    if len(os.fsencode(tmp)) <= 255:
        return tmp
    import hashlib

    return f".{hashlib.sha256(os.fsencode(name)).hexdigest()[:32]}.tmp-{os.getpid()}"


def fsync_dir(folder: Path) -> None:
    # The rename is durable only once the folder's entry is on disk too.
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


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
