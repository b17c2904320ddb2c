"""The decoded-folder cache: an ImageFolder data set decoded once, read back memory-mapped on later runs.

Each entry is a folder `cache_root()/folders/<key>/` holding the uint8 images and int64 labels as `.npy`
files (train-images, train-labels and, when the data set has a test/ folder, test-images, test-labels)
and `manifest.json` (source path, counts, shape, classes, creation time, messages to repeat). The key is
a hash of everything the decoded arrays depend on: the folder's resolved path, its sorted image files
with each one's size and mtime, the requested image size and the gray/RGB mode rule. A changed, added
or removed file gives a new key, so a stale entry is never read (and is pruned when its replacement is
written). An entry is written into a temporary folder and renamed into place, so a reader sees a whole
entry or none; removal renames it away first for the same reason.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import time
import uuid
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from capsctl._io import atomic_write_bytes, fsync_dir, resolved
from capsctl.errors import CapsctlError

FORMAT = 1  # bump when the layout or the decoding changes: old entries then miss (and are pruned)
MANIFEST = "manifest.json"
_TMP = ".tmp-"
_STALE_TMP_SECONDS = 3600  # a temporary folder this old was left by a killed run: nothing writes it now
_PARTS = ("train-images", "train-labels", "test-images", "test-labels")


def root() -> Path:
    from capsctl.data.datasets import cache_root

    return cache_root() / "folders"


def make_key(source: Path, image_size: tuple[int, int] | None, mode: str, files: Iterable[str]) -> str:
    """16 hex digits of SHA-256 over the source path, the size and mode requested and `files` (one line
    per image file: split, class, relative path, size, mtime in ns)."""
    h = hashlib.sha256()
    size = "x".join(map(str, image_size)) if image_size else "as-is"
    h.update(f"capsctl-folder-cache {FORMAT}\n{source}\n{size}\n{mode}\n".encode("utf-8", "surrogateescape"))
    for line in files:
        h.update(line.encode("utf-8", "surrogateescape") + b"\n")
    return h.hexdigest()[:16]


@dataclass
class Entry:
    key: str
    folder: Path
    manifest: dict[str, Any]

    @property
    def source(self) -> str:
        return str(self.manifest.get("source", "?"))

    def disk_bytes(self) -> int:
        return sum(f.stat().st_size for f in self.folder.iterdir() if f.is_file())


def _read_manifest(folder: Path) -> dict[str, Any] | None:
    try:
        m = json.loads((folder / MANIFEST).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return m if isinstance(m, dict) and m.get("format") == FORMAT and _well_formed(m) else None


def _well_formed(m: dict[str, Any]) -> bool:
    """The fields load() and `data list` read, of the types they expect (a hand-edited manifest is not)."""
    shape, classes, n_test = m.get("shape"), m.get("classes"), m.get("test_images")
    return (
        isinstance(m.get("source"), str)
        and isinstance(shape, list)
        and len(shape) == 3
        and all(isinstance(v, int) and v > 0 for v in shape)
        and isinstance(m.get("train_images"), int)
        and (n_test is None or isinstance(n_test, int))
        and isinstance(classes, list)
        and all(isinstance(c, str) for c in classes)
        and isinstance(m.get("notes", []), list)
        and all(isinstance(n, str) for n in m.get("notes", []))
    )


def entries() -> list[Entry]:
    """The cached sets, oldest first; folders that are not whole entries of this format are left out."""
    base = root()
    if not base.is_dir():
        return []
    found = []
    for d in base.iterdir():
        if d.name.startswith(".") or not d.is_dir():
            continue
        m = _read_manifest(d)
        if m is not None:
            found.append(Entry(d.name, d, m))
    return sorted(found, key=lambda e: (str(e.manifest.get("created", "")), e.key))


def load(key: str, classes: list[str]) -> tuple[dict[str, Any], dict[str, np.ndarray]] | None:
    """(manifest, {part: memory-mapped array}) of entry `key`, or None when there is none or it is damaged
    (then it is removed, and the caller decodes the folder again). `classes`: the folder's, as listed now
    (an entry's are the same unless its manifest was edited)."""
    folder = root() / key
    if not folder.is_dir():
        return None
    m = _read_manifest(folder)
    arrays: dict[str, np.ndarray] = {}
    try:
        if m is None or m["classes"] != list(classes):
            raise ValueError("no manifest, or not this folder's classes")
        for part in _PARTS:
            if (folder / f"{part}.npy").is_file():
                arrays[part] = np.load(folder / f"{part}.npy", mmap_mode="r", allow_pickle=False)
        _check(m, arrays)
    except MemoryError:
        raise
    except Exception:  # numpy's header parser alone raises ValueError, SyntaxError, tokenize.TokenError…
        _remove(folder)  # damaged outside capsctl (a full disk, a hand edit): decode again
        return None
    assert m is not None
    return m, arrays


def _check(m: dict[str, Any], arrays: dict[str, np.ndarray]) -> None:
    shape = tuple(m["shape"])
    for split in ("train", "test"):
        count = m[f"{split}_images"]
        if count is None and split == "test":
            if "test-images" in arrays or "test-labels" in arrays:
                raise ValueError("unexpected test arrays")
            continue
        x, y = arrays[f"{split}-images"], arrays[f"{split}-labels"]
        if x.dtype != np.uint8 or x.shape != (count, *shape) or y.dtype != np.int64 or y.shape != (count,):
            raise ValueError(f"{split} arrays do not match the manifest")
        if count and (int(y.min()) < 0 or int(y.max()) >= len(m["classes"])):
            raise ValueError(f"{split} labels outside the classes")


def store(key: str, manifest: dict[str, Any], arrays: dict[str, np.ndarray]) -> None:
    """Write entry `key` whole or not at all, then remove older entries of the same source and request.
    A failure (no space, a read-only cache) is said in one line and training goes on without a cache."""
    from capsctl._console import err

    base = root()
    tmp = base / f"{_TMP}{key}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    try:
        base.mkdir(parents=True, exist_ok=True)
        _sweep(base)
        tmp.mkdir()
        for part, arr in arrays.items():
            with open(tmp / f"{part}.npy", "wb") as f:
                np.save(f, np.ascontiguousarray(arr), allow_pickle=False)
                f.flush()
                os.fsync(f.fileno())
        # the manifest goes last: a folder without one is never read as an entry
        atomic_write_bytes(tmp / MANIFEST, json.dumps({**manifest, "format": FORMAT, "key": key}).encode())
        try:
            os.rename(tmp, base / key)
        except OSError:
            if not (base / key).is_dir():
                raise
            _remove(tmp)  # another run wrote the same entry meanwhile: it is the same data
        fsync_dir(base)
    except OSError as e:
        _remove(tmp)
        err.print(
            f"could not cache the decoded images in {base} ({e.strerror or e}); the next run decodes again",
            highlight=False,
            soft_wrap=True,
        )
        return
    for old in entries():
        same = all(old.manifest.get(k) == manifest.get(k) for k in ("source", "image_size", "mode"))
        if same and old.key != key:
            _remove(old.folder)


def forget(what: str) -> list[Entry]:
    """Remove the entries named by `what`: a key, a unique key prefix, or the source folder's path."""
    found = entries()
    hit = [e for e in found if e.key == what]
    if not hit:
        source = str(resolved(what, "data forget"))
        hit = [e for e in found if e.source == source]
    if not hit and len(what) >= 4:
        hit = [e for e in found if e.key.startswith(what)]
        if len(hit) > 1:
            raise CapsctlError(f"data forget {what}: {len(hit)} cached sets have keys starting so; give more")
    if not hit:
        short = [e for e in found if e.key.startswith(what)] if len(what) < 4 else []
        if short:  # (a key's start is taken from 4 characters on: fewer would match sets by chance)
            raise CapsctlError(f"data forget {what}: give at least 4 characters of the key")
        raise CapsctlError(
            f"data forget {what}: no cached user set has this key or source path (see `capsctl data list`)"
        )
    for e in hit:
        _remove(e.folder)
    return hit


def _remove(folder: Path) -> None:
    # renamed away first, so no reader ever meets a half-deleted entry
    if not folder.exists():
        return
    doomed = folder.with_name(f"{_TMP}rm-{folder.name}-{uuid.uuid4().hex[:8]}")
    try:
        os.rename(folder, doomed)
    except OSError:
        doomed = folder
    shutil.rmtree(doomed, ignore_errors=True)


def _sweep(base: Path) -> None:
    """Remove temporary folders that runs killed mid-write left behind, and entries no run can read: of an
    older FORMAT, or damaged (an entry appears whole, by a rename, so one without a readable manifest is
    not being written). An entry of a newer FORMAT belongs to a newer capsctl sharing the cache: kept."""
    now = time.time()
    for d in base.glob(f"{_TMP}*"):
        with contextlib.suppress(OSError):
            if now - d.stat().st_mtime > _STALE_TMP_SECONDS:
                shutil.rmtree(d, ignore_errors=True)
    for d in base.iterdir():
        if d.name.startswith(".") or not d.is_dir():
            continue
        try:
            m = json.loads((d / MANIFEST).read_text(encoding="utf-8"))
        except FileNotFoundError:
            m = None  # no manifest: damaged (an entry appears whole, with its manifest)
        except OSError:
            continue  # unreadable just now (a busy or remote disk): not known to be damaged, kept
        except ValueError:
            m = None
        fmt = m.get("format") if isinstance(m, dict) else None
        whole = isinstance(m, dict) and fmt == FORMAT and _well_formed(m)
        if not whole and (not isinstance(fmt, int) or fmt <= FORMAT):  # (a newer FORMAT's entry is kept)
            _remove(d)


def human_bytes(n: int) -> str:
    size = float(n)
    for unit in ("B", "kB", "MB"):
        if size < 1000:
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1000
    return f"{size:.1f} GB"
