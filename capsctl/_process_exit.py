"""How a capsctl process ends: normally, or, once a framework asked for it, at once with its exit code.

Why the second: a rank of a torch.distributed job can abort while Python finalizes ("terminate called
without an active exception", SIGABRT). Gloo runs each collective on a worker thread, which may still hold
the collective's tensors after the main thread moved on; when that thread drops the last reference to a
tensor Python already let go of, it must take the GIL, and a thread that asks for the GIL while the
interpreter is finalizing is ended in a way C++ turns into std::terminate (pytorch/pytorch#179291). So a
rank whose work is done and said (files closed, streams flushed) ends with os._exit: nothing of the
interpreter's teardown is left to race."""

from __future__ import annotations

import os
import sys
from typing import NoReturn

_skip_finalizing = False


def skip_finalizing() -> None:
    """From now on, `end` ends this process without finalizing the interpreter."""
    global _skip_finalizing
    _skip_finalizing = True


def end(code: object) -> NoReturn:
    """End the process as `sys.exit(code)` does (None is 0; other non-ints are printed, then 1)."""
    if not _skip_finalizing:
        sys.exit(code)  # type: ignore[arg-type]
    if code is None:
        status = 0
    elif isinstance(code, int):
        status = code
    else:
        print(code, file=sys.stderr)
        status = 1
    for stream in (sys.stdout, sys.stderr, sys.__stdout__, sys.__stderr__):
        try:
            if stream is not None:
                stream.flush()
        except (OSError, ValueError):  # a closed pipe or stream: nothing more to say on it
            pass
    os._exit(status & 0xFF)
