"""A data set in an ImageFolder layout: DIR/train/<class>/*.png (jpg, jpeg, bmp, webp) and DIR/test/<class>/…

Class names are the sorted sub-folder names of train/; test/ may hold fewer classes, never others.
Images are read as they are (no inversion): 8-bit gray or RGB, /255. Every image must have one size
unless `image_size` (height, width) is given: then each is scaled to fit and padded with black to
that size, aspect kept. Grey and colour files mixed are converted to the majority's mode (said once
on stderr). Files that are not images by their suffix are skipped and counted. Every problem is one
CapsctlError naming the file or folder.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from capsctl.errors import CapsctlError

SUFFIXES = frozenset({".png", ".jpg", ".jpeg", ".bmp", ".webp"})
_FORMATS = ["PNG", "JPEG", "BMP", "WEBP"]
_GRAY_MODES = frozenset({"1", "L", "LA", "La", "I", "I;16", "I;16L", "I;16B", "I;16N", "F"})
MAX_PIXELS = 4096 * 4096


def is_image_folder(root: Path) -> bool:
    return (root / "train").is_dir()


@dataclass
class _Entry:
    path: Path
    label: int
    size: tuple[int, int]  # (height, width)
    gray: bool


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return text[0][:200] if text else type(e).__name__


def _open(path: Path) -> Any:
    from PIL import Image

    try:
        if path.stat().st_size == 0:
            raise CapsctlError(f"{path}: empty file (0 bytes)")
        return Image.open(path, formats=_FORMATS)
    except CapsctlError:
        raise
    except Exception as e:
        raise CapsctlError(f"{path}: not a readable image ({_first_line(e)})") from None


def _scan(split_dir: Path, classes: list[str], role: str) -> tuple[list[_Entry], int]:
    """The image entries under split_dir/<class>/ (headers only) and the count of skipped files."""
    entries: list[_Entry] = []
    skipped = 0
    for label, name in enumerate(classes):
        folder = split_dir / name
        if not folder.is_dir():
            continue  # test/ may lack a class
        found = 0
        for f in sorted(folder.rglob("*")):
            if f.is_dir():
                continue
            if f.suffix.lower() not in SUFFIXES:
                skipped += 1
                continue
            with _open(f) as im:
                w, h = im.size
                if h * w > MAX_PIXELS:
                    raise CapsctlError(f"{f}: image is {h}x{w}, over the limit of {MAX_PIXELS:,} pixels")
                entries.append(_Entry(f, label, (h, w), im.mode in _GRAY_MODES))
            found += 1
        if not found:
            raise CapsctlError(f"{folder}: an empty class folder (no {role} images)")
    return entries, skipped


def load_image_folder(
    root: Path, image_size: tuple[int, int] | None = None
) -> tuple[tuple[np.ndarray, np.ndarray], tuple[np.ndarray, np.ndarray], tuple[str, ...]]:
    """((train images, labels), (test images, labels), class names); images float32 (N, H, W, C)."""
    from capsctl._console import err

    train_dir, test_dir = root / "train", root / "test"
    if not test_dir.is_dir():
        raise CapsctlError(f"{root}: has train/ but no test/ folder (expected DIR/test/<class>/…)")
    classes = sorted(p.name for p in train_dir.iterdir() if p.is_dir())
    if not classes:
        raise CapsctlError(f"{train_dir}: no class folders (expected {train_dir}/<class>/*.png)")
    extra = sorted(p.name for p in test_dir.iterdir() if p.is_dir() and p.name not in classes)
    if extra:
        raise CapsctlError(f"{test_dir / extra[0]}: test class {extra[0]!r} is not among the train/ classes")
    train, skipped_train = _scan(train_dir, classes, "train")
    test, skipped_test = _scan(test_dir, classes, "test")
    if not test:
        raise CapsctlError(f"{test_dir}: no test images")
    entries = train + test
    if image_size is None:
        first = entries[0]
        other = next((e for e in entries if e.size != first.size), None)
        if other is not None:
            raise CapsctlError(
                f"images differ in size: {first.path} is {first.size[0]}x{first.size[1]}, {other.path} is "
                f"{other.size[0]}x{other.size[1]}; give --image-size HxW to resize them all"
            )
    grays = sum(e.gray for e in entries)
    gray = grays * 2 >= len(entries)
    if 0 < grays < len(entries):
        minority = len(entries) - grays if gray else grays
        err.print(
            f"{root}: {minority} of {len(entries)} images converted to "
            f"{'gray' if gray else 'RGB'} (the majority's mode)",
            highlight=False,
            soft_wrap=True,
        )
    skipped = skipped_train + skipped_test
    if skipped:
        err.print(f"{root}: {skipped} non-image file(s) skipped", highlight=False, soft_wrap=True)
    return (
        _read_all(train, gray, image_size),
        _read_all(test, gray, image_size),
        tuple(classes),
    )


def _read_all(
    entries: list[_Entry], gray: bool, image_size: tuple[int, int] | None
) -> tuple[np.ndarray, np.ndarray]:
    mode = "L" if gray else "RGB"
    arrays = []
    for e in entries:
        with _open(e.path) as im:
            try:
                im.load()
                if mode == "L" and im.mode.startswith("I"):  # 16-bit or 32-bit integer gray
                    from PIL import Image

                    arr = np.asarray(im, dtype=np.float64)
                    scale = 65535.0 if im.mode.startswith("I;16") or arr.max() > 255 else 255.0
                    conv = Image.fromarray(np.clip(arr / scale * 255 + 0.5, 0, 255).astype(np.uint8))
                else:
                    conv = im.convert(mode)
            except Exception as ex:
                raise CapsctlError(f"{e.path}: truncated or corrupt image ({_first_line(ex)})") from None
        if image_size is not None:
            conv = fit_pad(conv, image_size)
        arrays.append(np.asarray(conv, dtype=np.uint8))
    x = np.stack(arrays)
    if gray:
        x = x[..., None]
    labels = np.array([e.label for e in entries], np.int64)
    return x.astype(np.float32) / 255.0, labels


def fit_pad(im: Any, size: tuple[int, int]) -> Any:
    """Scale a Pillow image to fit (height, width) with its aspect kept, centred on black."""
    from PIL import Image

    h, w = size
    iw, ih = im.size
    scale = min(h / ih, w / iw)
    nw, nh = max(1, round(iw * scale)), max(1, round(ih * scale))
    resized = im.resize((nw, nh), Image.Resampling.BILINEAR) if (nw, nh) != (iw, ih) else im
    canvas = Image.new(im.mode, (w, h), 0)
    canvas.paste(resized, ((w - nw) // 2, (h - nh) // 2))
    return canvas
