"""Process settings that make eager PyTorch fast on a small CPU, and the device choice."""

from __future__ import annotations

import ctypes
import functools
import sys

import torch

# glibc returns freed activation memory to the OS after every step by default; raising the
# mmap and trim thresholds keeps it in the heap (measured +15-20% training speed on 2 cores).
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3


@functools.cache
def tune_malloc() -> bool:
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
        ok = libc.mallopt(_M_MMAP_THRESHOLD, 1 << 30) == 1
        ok &= libc.mallopt(_M_TRIM_THRESHOLD, 1 << 30) == 1
        return bool(ok)
    except (OSError, AttributeError):
        return False


@functools.cache
def device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def memory_format() -> torch.memory_format:
    # channels_last lets oneDNN run NHWC convolutions without layout conversions
    return torch.channels_last


def describe() -> str:
    dev = device()
    cuda = dev.type == "cuda"
    where = torch.cuda.get_device_name(dev) if cuda else f"cpu, {torch.get_num_threads()} threads"
    return f"torch {torch.__version__} ({where})"
