"""capsctl._process_exit: a process asked to skip finalizing ends with its exit code and everything it
wrote, but runs none of the interpreter's teardown (the atexit hooks here stand for it)."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _end(code: str, skip: bool) -> subprocess.CompletedProcess[str]:
    script = textwrap.dedent(f"""
        import atexit, sys
        from capsctl._process_exit import end, skip_finalizing
        atexit.register(lambda: print(" finalized", end=""))
        print("said", end="")           # buffered: a pipe, and no newline
        print("told", end="", file=sys.stderr)
        if {skip}:
            skip_finalizing()
        end({code})
    """)
    cmd = [sys.executable, "-c", script]
    return subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=60)


@pytest.mark.parametrize(("code", "status"), [("None", 0), ("3", 3), ("2", 2)])
def test_a_process_that_skips_finalizing_keeps_its_output_and_exit_code(code, status):
    r = _end(code, skip=True)
    assert (r.returncode, r.stdout, r.stderr) == (status, "said", "told")


def test_a_message_instead_of_a_code_is_printed_and_exits_1():
    r = _end("'error: no'", skip=True)
    assert (r.returncode, r.stdout, r.stderr) == (1, "said", "told" + "error: no\n")


def test_otherwise_the_process_finalizes_as_sys_exit_does():
    r = _end("3", skip=False)
    assert (r.returncode, r.stdout, r.stderr) == (3, "said finalized", "told")
