"""The one error type users see: a one-line message and exit code 2."""

from __future__ import annotations

import sys
from collections.abc import Callable


class CapsctlError(Exception):
    """Bad input or environment; the CLI prints `error: <message>` and exits with `exit_code`."""

    exit_code = 2


class TrainingStopped(CapsctlError):
    """Training ended early on purpose (NaN loss, Ctrl-C); the last good checkpoint is kept."""

    exit_code = 1

    def __init__(self, message: str, exit_code: int = 1) -> None:
        super().__init__(message)
        self.exit_code = exit_code


def os_error_exit(e: OSError) -> tuple[str, int]:
    """The one line (`error: FILE: reason`) and the exit status of an OSError that reached the top: a path
    the user gave that cannot be used is bad input (2); a failure of the machine, such as a full disk, is
    not (1)."""
    import errno

    where = f"{e.filename}: " if getattr(e, "filename", None) else ""
    usage = isinstance(
        e, (FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError, FileExistsError)
    ) or e.errno in (errno.ELOOP, errno.ENAMETOOLONG, errno.EROFS)
    return f"error: {where}{e.strerror or e}", 2 if usage else 1


def run_script(main: Callable[[], object]) -> int:
    """The exit status of a tools/ script's `main`: a CapsctlError or an OSError is one line `error: ...`
    on stderr with the status the capsctl command gives it."""
    try:
        main()
    except CapsctlError as e:
        print(f"error: {e}", file=sys.stderr)
        return e.exit_code
    except OSError as e:
        line, status = os_error_exit(e)
        print(line, file=sys.stderr)
        return status
    return 0


def is_out_of_memory(e: BaseException) -> bool:
    """Whether a framework error says memory ran out (read by name and text, so no framework is imported):
    torch's allocators raise RuntimeError (OutOfMemoryError on a GPU), TensorFlow ResourceExhaustedError."""
    if isinstance(e, MemoryError) or type(e).__name__ == "OutOfMemoryError":
        return True
    text = str(e)
    if type(e).__name__ == "ResourceExhaustedError":  # (also a gRPC message over its size limit: not memory)
        return text.startswith("OOM") or "out of memory" in text.lower()
    said = "can't allocate memory" in text or "out of memory" in text.lower()
    return isinstance(e, RuntimeError) and said


def reraise_interrupt(e: BaseException) -> None:
    """Raise KeyboardInterrupt if `e` came from one: a library that wraps every error of a long call
    (torch's ONNX exporter, Keras' loader) turned Ctrl-C into "could not export this model"."""
    seen: set[int] = set()
    cause: BaseException | None = e
    while cause is not None and id(cause) not in seen:
        if isinstance(cause, KeyboardInterrupt):
            raise KeyboardInterrupt from e
        seen.add(id(cause))
        cause = cause.__cause__ or cause.__context__


def first_line(e: BaseException, fallback: str | None = None) -> str:
    """A library error's first line (at most 200 characters), to quote inside a one-line message;
    `fallback` (else the error's type name) when it has no text."""
    text = str(e).strip().splitlines()
    return text[0][:200] if text else fallback or type(e).__name__


# -- one line per job: the ranks of `capsctl train --nproc` leave their error lines to the launcher ----------
RANK_ERRORS_ENV = "CAPSCTL_RANK_ERRORS"  # a folder the launcher made; each rank writes rank-R.txt there
_rank: int | None = None  # this process's rank in a job (set when it joins one)


def set_rank(rank: int) -> None:
    global _rank
    _rank = rank


def leave_to_launcher(line: str) -> bool:
    """Record a failing rank's error `line` for the `--nproc` launcher; True when the launcher will say it
    (ranks > 0: it prints the line unless rank 0 said the same), False when this process prints it."""
    import os

    folder = os.environ.get(RANK_ERRORS_ENV)
    if _rank is None or not folder:
        return False
    path = os.path.join(folder, f"rank-{_rank}.txt")
    try:  # whole or not at all: another rank waits for rank 0's file to appear
        with open(path + ".part", "w", encoding="utf-8") as f:
            f.write(line)
        os.replace(path + ".part", path)
    except OSError:
        return False
    if _rank > 0:
        _wait_for_rank_0(folder)
    return _rank > 0


RANK_0_GRACE_S = 10.0


def _wait_for_rank_0(folder: str) -> None:
    """Give rank 0 a moment to reach the same error before this rank exits: the launcher stops every
    other rank as soon as one exits, and a rank 0 still loading the data (a busy machine) would then be
    stopped before it could say the line, and the job would print `[rank 1] error: …` for what every
    rank meets. A rank 0 that does not fail alike costs the job this grace once."""
    import os
    import time

    deadline = time.monotonic() + RANK_0_GRACE_S
    while time.monotonic() < deadline and not os.path.exists(os.path.join(folder, "rank-0.txt")):
        time.sleep(0.05)
