"""CIFAR-10, the official binary version (`cifar-10-binary.tar.gz`), read straight from the archive.

Never the pickled (python) version: unpickling a download can run code. The archive holds
cifar-10-batches-bin/data_batch_1..5.bin (training) and test_batch.bin, each a run of 3,073-byte
records: 1 label byte (0..9), then the 32x32 red plane, green plane and blue plane (row-major).
Only those six regular members are read, into memory; nothing is extracted to disk.
"""

from __future__ import annotations

import tarfile
import zlib
from pathlib import Path

import numpy as np

from capsctl.errors import CapsctlError

ARCHIVE = "cifar-10-binary.tar.gz"
FOLDER = "cifar-10-batches-bin"
TRAIN_MEMBERS = tuple(f"{FOLDER}/data_batch_{k}.bin" for k in range(1, 6))
TEST_MEMBERS = (f"{FOLDER}/test_batch.bin",)
RECORD = 1 + 3 * 32 * 32
CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")


def read_archive(path: Path) -> tuple[tuple[np.ndarray, np.ndarray], tuple[np.ndarray, np.ndarray]]:
    """((train images, labels), (test images, labels)): float32 (N, 32, 32, 3) in [0, 1], int64 labels."""
    try:
        with tarfile.open(path, "r:gz") as tar:
            return _split(tar, path, TRAIN_MEMBERS), _split(tar, path, TEST_MEMBERS)
    except CapsctlError:
        raise
    except (tarfile.TarError, OSError, EOFError, zlib.error) as e:  # (zlib: a damaged gzip stream)
        raise CapsctlError(f"{path}: not a readable CIFAR-10 binary archive ({e})") from None


def _split(tar: tarfile.TarFile, path: Path, members: tuple[str, ...]) -> tuple[np.ndarray, np.ndarray]:
    parts = []
    for name in members:
        try:
            info = tar.getmember(name)
        except KeyError:
            raise CapsctlError(f"{path}: {name} is missing (not the CIFAR-10 binary version?)") from None
        f = tar.extractfile(info) if info.isfile() else None
        if f is None:
            raise CapsctlError(f"{path}: {name} is not a regular file")
        raw = f.read()
        if not raw or len(raw) % RECORD:
            raise CapsctlError(
                f"{path}: {name} has {len(raw)} bytes, not a whole number of {RECORD}-byte records"
            )
        parts.append(np.frombuffer(raw, np.uint8).reshape(-1, RECORD))
    records = np.concatenate(parts)
    labels = records[:, 0].astype(np.int64)
    if labels.max() >= len(CLASSES):
        raise CapsctlError(f"{path}: label {int(labels.max())} is out of range (CIFAR-10 labels are 0..9)")
    images = records[:, 1:].reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)  # planes R, G, B -> channels last
    return images.astype(np.float32) / 255.0, labels
