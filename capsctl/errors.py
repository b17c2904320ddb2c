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
