"""The one error type users see: a one-line message and exit code 2."""

from __future__ import annotations


class CapsctlError(Exception):
    """Bad input or environment; the CLI prints `error: <message>` and exits with `exit_code`."""

    exit_code = 2


class TrainingStopped(CapsctlError):
    """Training ended early on purpose (NaN loss, Ctrl-C); the last good checkpoint is kept."""

    exit_code = 1

    def __init__(self, message: str, exit_code: int = 1) -> None:
        super().__init__(message)
        self.exit_code = exit_code


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
    try:
        with open(os.path.join(folder, f"rank-{_rank}.txt"), "w", encoding="utf-8") as f:
            f.write(line)
    except OSError:
        return False
    return _rank > 0
