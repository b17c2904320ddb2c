"""Reader for the IDX format of MNIST-style data sets (gzipped or raw), strict about every field."""

from __future__ import annotations

import gzip
import math
import os
import struct
import zlib
from pathlib import Path

import numpy as np

from capsctl._io import read_user_file
from capsctl.errors import CapsctlError

_TYPES: dict[int, np.dtype] = {
    0x08: np.dtype("u1"),
    0x09: np.dtype("i1"),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}
_MAX_BYTES = 1 << 31  # 2 GiB decompressed: far beyond any MNIST-style set, a guard against gzip bombs


def _decompress(raw: bytes, source: str) -> bytes:
    if raw[:2] != b"\x1f\x8b":
        return raw
    out = bytearray()
    rest = raw
    try:
        while True:  # a gzip file may hold several members, read as one stream (as gzip(1) does)
            d = zlib.decompressobj(wbits=31)
            out += d.decompress(rest, max(1, _MAX_BYTES - len(out)))
            if d.unconsumed_tail or len(out) >= _MAX_BYTES:
                raise CapsctlError(f"{source}: decompresses to more than {_MAX_BYTES} bytes")
            if not d.eof:
                raise CapsctlError(f"{source}: gzip stream is truncated")
            rest = d.unused_data
            if not rest.strip(b"\0"):  # nothing or zero padding after the last member
                return bytes(out)
            if rest[:2] != b"\x1f\x8b":
                raise CapsctlError(f"{source}: {len(rest)} stray bytes after the gzip data (damaged file?)")
    except (zlib.error, EOFError, gzip.BadGzipFile) as e:
        raise CapsctlError(f"{source}: corrupt gzip data ({e})") from None


def parse_idx(raw: bytes, source: str) -> np.ndarray:
    """Decode IDX bytes (gzip is detected by its magic) into an array of the stored type."""
    data = _decompress(raw, source)
    if len(data) < 4:
        raise CapsctlError(f"{source}: too short for an IDX file ({len(data)} bytes)")
    zero, code, ndim = struct.unpack(">HBB", data[:4])
    if zero != 0 or code not in _TYPES:
        raise CapsctlError(
            f"{source}: bad IDX magic {data[:4].hex()} (expected 0000 08 0n for unsigned bytes)"
        )
    if not 1 <= ndim <= 4:
        raise CapsctlError(f"{source}: IDX file claims {ndim} dimensions (expected 1 to 4)")
    head = 4 + 4 * ndim
    if len(data) < head:
        raise CapsctlError(f"{source}: truncated IDX header")
    dims = struct.unpack(f">{ndim}I", data[4:head])
    dtype = _TYPES[code]
    expected = math.prod(dims) * dtype.itemsize
    got = len(data) - head
    if got != expected:
        what = "truncated" if got < expected else "has trailing bytes"
        raise CapsctlError(
            f"{source}: IDX data {what}: header says {list(dims)} ({expected} bytes), found {got} bytes"
        )
    return np.frombuffer(data, dtype=dtype, offset=head).reshape(dims)


def item_count(path: str | os.PathLike[str]) -> int | None:
    """The first dimension an IDX file's header gives (gzipped or not), read without decoding the data;
    None when the header cannot be read (the full reader names what is wrong)."""
    try:
        with gzip.open(path, "rb") if str(path).endswith(".gz") else open(path, "rb") as f:
            head = f.read(8)
    except (OSError, EOFError, ValueError, zlib.error):
        return None
    if len(head) < 8 or head[:2] != b"\0\0" or head[2] not in _TYPES or head[3] < 1:
        return None
    return int(struct.unpack(">I", head[4:8])[0])


def read_idx(path: str | os.PathLike[str]) -> np.ndarray:
    return parse_idx(read_user_file(path, "an IDX file"), str(Path(path)))


def load_images(path: str | os.PathLike[str]) -> np.ndarray:
    """Images as float32 (N, H, W, 1) scaled to [0, 1]."""
    arr = read_idx(path)
    if arr.ndim != 3 or arr.dtype != np.uint8:
        raise CapsctlError(
            f"{path}: expected unsigned-byte images of 3 dimensions (N, H, W), found {arr.ndim}-D {arr.dtype}"
        )
    if arr.shape[0] == 0 or arr.shape[1] == 0 or arr.shape[2] == 0:
        raise CapsctlError(f"{path}: holds no images (shape {list(arr.shape)})")
    return (arr.astype(np.float32) / 255.0)[..., None]


def load_labels(path: str | os.PathLike[str], num_classes: int = 10) -> np.ndarray:
    arr = read_idx(path)
    if arr.ndim != 1 or arr.dtype != np.uint8:
        raise CapsctlError(
            f"{path}: expected unsigned-byte labels of 1 dimension, found {arr.ndim}-D {arr.dtype}"
        )
    if arr.size and int(arr.max()) >= num_classes:
        raise CapsctlError(f"{path}: label {int(arr.max())} is out of range 0..{num_classes - 1}")
    return arr.astype(np.int64)
