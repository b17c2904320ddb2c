"""A data set in an ImageFolder layout: DIR/train/<class>/*.png (jpg, jpeg, bmp, webp) and DIR/test/<class>/…

Class names are the sorted sub-folder names of train/; test/ may hold fewer classes, never others, and
may be missing altogether (then the test split is None: the commands hold out training images instead,
with --holdout N or --val-fraction F). Images are read as they are (no inversion; turned upright by their
EXIF orientation), as `predict` reads them: 8-bit gray or RGB /255, 16-bit gray rescaled, alpha
composited on the background that contrasts with the ink. Every image must have one size unless
`image_size` (height, width) is given: then each is scaled to fit and padded to that size, aspect kept,
with its background (white for a gray image with a light border, else black). Grey and colour files mixed
are converted to the majority's mode (said once on stderr). Files that are not images by their suffix are
skipped and counted. Every problem is one CapsctlError naming the file or folder.

Sample order: each split's images are sorted by file name across classes (runs of digits compared as
numbers, then the name, then the class), not class by class. So a set exported as
DIR/train/<class>/<index>.png comes back in its original order (the same seed then draws the same
batches as from the original arrays), and `--limit N` takes a mix of classes, not the first class.

Decoded once: the uint8 arrays are cached (capsctl.data._folder_cache) under a key of the folder's
file list, sizes and mtimes; a later run finds them by listing and stat()-ing the files, without
opening any image, and memory-maps them.
"""

from __future__ import annotations

import os
import re
import stat
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from capsctl._io import resolved
from capsctl.data import _folder_cache
from capsctl.errors import CapsctlError, first_line

SUFFIXES = frozenset({".png", ".jpg", ".jpeg", ".bmp", ".webp"})
_FORMATS = ["PNG", "JPEG", "BMP", "WEBP"]
_GRAY_MODES = frozenset({"1", "L", "LA", "La", "I", "I;16", "I;16L", "I;16B", "I;16N", "F"})
MAX_PIXELS = 4096 * 4096
# how gray vs RGB is chosen and pixels decoded (part of the cache key: '+alpha' since alpha is composited
# and 16-bit gray rescaled into RGB sets too, so entries decoded before are not served)
# (+exif: images turned upright by their EXIF orientation; +graypal: a palette of grays counts as gray;
# +pad: --image-size pads a light gray image with white; +la16: a 16-bit gray+alpha PNG counts as gray;
# +trns: a gray or RGB image's colour key is transparency)
MODE_RULE = "majority+alpha+exif+graypal+pad+la16+trns"
# the modes whose Pillow convert to L or RGB keeps what predict reads (no alpha, 8 bits a channel)
_PLAIN_MODES = frozenset({"L", "RGB", "1", "P", "CMYK", "YCbCr"})
PROGRESS_MIN = 1000  # a smaller folder decodes in about a second: no progress bar

Pair = tuple[np.ndarray, np.ndarray]


def is_image_folder(root: Path) -> bool:
    return (root / "train").is_dir()


@dataclass
class _File:
    path: str  # a string: a Path per file costs more than the stat() when listing a large folder
    rel: str  # path inside its class folder, '/'-separated
    label: int
    size: int  # bytes
    # (not the ctime: a copy that keeps times, `rsync -a` to a scratch disk, a chmod would miss the cache
    # on every run; a file rewritten with its old size and mtime put back is not seen, as by make or rsync)
    mtime_ns: int


@dataclass
class _Entry:
    path: Path
    label: int
    size: tuple[int, int]  # (height, width), upright
    gray: bool
    turn: int = 1  # its EXIF orientation (capsctl.data.images.orientation), read once in the header pass



def _open(path: Path) -> Any:
    import warnings

    from PIL import Image

    try:
        with warnings.catch_warnings():  # (Pillow's multi-line DecompressionBombWarning: MAX_PIXELS says it)
            warnings.simplefilter("ignore")
            return Image.open(path, formats=_FORMATS)
    except Exception as e:
        raise CapsctlError(f"{path}: not a readable image ({first_line(e)})") from None


def natural_key(name: str) -> tuple[str | int, ...]:
    """'img12.png' -> ('img', 12, '.png'): runs of digits compare as numbers ('2' before '10').
    re.split with a group alternates text and digits, so equal positions always hold the same type."""
    return tuple(int(p) if i % 2 else p for i, p in enumerate(re.split(r"(\d+)", name)))


def _list(split_dir: Path, classes: list[str], role: str) -> tuple[list[_File], int]:
    """The image files under split_dir/<class>/ (stat() only, nothing opened) in sample order, and the
    count of skipped non-image files.

    os.walk and plain strings rather than Path.rglob: a cached 70,000-image folder is listed on every
    run, and pathlib's per-file parsing cost seconds there; walking costs a fraction of one."""
    files: list[_File] = []
    skipped = 0
    for label, name in enumerate(classes):
        folder = os.path.join(split_dir, name)
        if not os.path.isdir(folder):
            continue  # test/ may lack a class
        found = 0
        seen = {os.path.realpath(folder)}  # each real folder once: a link loop is walked no further
        for dirpath, dirnames, filenames in os.walk(folder, onerror=_walk_error, followlinks=True):
            fresh = []
            for d in sorted(dirnames):
                if _hidden(d):  # (.ipynb_checkpoints, macOS __MACOSX, a NAS's @eaDir thumbnails)
                    continue
                real = os.path.realpath(os.path.join(dirpath, d))
                if real not in seen:
                    seen.add(real)
                    fresh.append(d)
            dirnames[:] = fresh
            rel_dir = os.path.relpath(dirpath, folder).replace(os.sep, "/")
            for fname in filenames:
                full = os.path.join(dirpath, fname)
                if fname.startswith(".") or os.path.splitext(fname)[1].lower() not in SUFFIXES:
                    # (dot files: macOS's ._0.png AppleDouble metadata, made by archives and copies from a
                    # Mac, is named as an image and is none; counted as skipped)
                    skipped += 1
                    continue
                try:
                    st = os.stat(full)
                except OSError as e:
                    raise CapsctlError(f"{full}: cannot read ({e.strerror or e})") from None
                if stat.S_ISDIR(st.st_mode):
                    continue
                if st.st_size == 0:
                    raise CapsctlError(f"{full}: empty file (0 bytes)")
                rel = fname if rel_dir == "." else f"{rel_dir}/{fname}"
                files.append(_File(full, rel, label, st.st_size, st.st_mtime_ns))
                found += 1
        if not found:
            raise CapsctlError(f"{folder}: an empty class folder (no {role} images)")
    files.sort(key=lambda f: (natural_key(f.rel), f.rel, f.label))
    return files, skipped


def _hidden(folder: str) -> bool:
    """A folder that holds no samples: hidden ones, macOS archives' __MACOSX, Synology's @eaDir."""
    return folder.startswith((".", "@")) or folder == "__MACOSX"


def _walk_error(e: OSError) -> None:
    raise CapsctlError(f"{e.filename}: cannot read ({e.strerror or e})") from None


def load_image_folder(
    root: Path, image_size: tuple[int, int] | None = None
) -> tuple[Pair, Pair | None, tuple[str, ...]]:
    """((train images, labels), (test images, labels) or None without test/, class names); images
    float32 (N, H, W, C) in [0, 1], labels int64."""
    from capsctl._console import err

    train_dir, test_dir = root / "train", root / "test"
    # (hidden folders are not classes: Jupyter's .ipynb_checkpoints, a .git, __MACOSX, ...)
    classes = sorted(p.name for p in train_dir.iterdir() if p.is_dir() and not _hidden(p.name))
    if not classes:
        raise CapsctlError(f"{train_dir}: no class folders (expected {train_dir}/<class>/*.png)")
    if len(classes) < 2:  # (it trained to 100% at loss 0 and predicted that class for everything)
        raise CapsctlError(
            f"{train_dir}: one class folder ({classes[0]!r}); a classifier needs two or more"
        )
    has_test = test_dir.is_dir()
    if has_test:
        extra = sorted(
            p.name
            for p in test_dir.iterdir()
            if p.is_dir() and not _hidden(p.name) and p.name not in classes
        )
        if extra:
            raise CapsctlError(
                f"{test_dir / extra[0]}: test class {extra[0]!r} is not among the train/ classes"
            )
    train, skipped = _list(train_dir, classes, "train")
    test: list[_File] = []
    if has_test:
        test, skipped_test = _list(test_dir, classes, "test")
        skipped += skipped_test
        if not test:
            raise CapsctlError(f"{test_dir}: no test images")
    if skipped:  # said on every run: the listing counts them without opening anything
        err.print(f"{root}: {skipped} non-image file(s) skipped", highlight=False, soft_wrap=True)

    source = resolved(root, "--dataset")
    key = _folder_cache.make_key(
        source,
        image_size,
        MODE_RULE,
        (
            f"{split}\t{classes[f.label]}\t{f.rel}\t{f.size}\t{f.mtime_ns}"
            for split, files in (("train", train), ("test", test))
            for f in files
        ),
    )
    cached = _folder_cache.load(key, classes)
    if cached is not None:
        manifest, arrays = cached
        for note in manifest.get("notes", []):
            err.print(note, highlight=False, soft_wrap=True)
        return (
            _as_float(arrays["train-images"], arrays["train-labels"]),
            _as_float(arrays["test-images"], arrays["test-labels"]) if has_test else None,
            tuple(manifest["classes"]),
        )

    with _Bar(len(train) + len(test), root) as bar:
        entries = [_header(f, bar) for f in train + test]
        if image_size is None:
            first = entries[0]
            other = next((e for e in entries if e.size != first.size), None)
            if other is not None:
                raise CapsctlError(
                    f"images differ in size: {first.path} is {first.size[0]}x{first.size[1]}, "
                    f"{other.path} is {other.size[0]}x{other.size[1]}; "
                    "give --image-size HxW to resize them all"
                )
        grays = sum(e.gray for e in entries)
        gray = grays * 2 >= len(entries)
        notes = []
        if 0 < grays < len(entries):
            minority = len(entries) - grays if gray else grays
            notes.append(
                f"{root}: {minority} of {len(entries)} images converted to "
                f"{'gray' if gray else 'RGB'} (the majority's mode)"
            )
        for note in notes:
            err.print(note, highlight=False, soft_wrap=True)
        bar.start("decoding")
        x_train, y_train = _read_all(entries[: len(train)], gray, image_size, bar)
        x_test, y_test = _read_all(entries[len(train) :], gray, image_size, bar) if has_test else (None, None)

    arrays = {"train-images": x_train, "train-labels": y_train}
    if x_test is not None and y_test is not None:
        arrays.update({"test-images": x_test, "test-labels": y_test})
    _folder_cache.store(
        key,
        {
            "source": str(source),
            "image_size": list(image_size) if image_size else None,
            "mode": MODE_RULE,
            "classes": list(classes),
            "train_images": len(x_train),
            "test_images": None if x_test is None else len(x_test),
            "shape": list(x_train.shape[1:]),
            "notes": notes,
            "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        },
        arrays,
    )
    return (
        _as_float(x_train, y_train),
        _as_float(x_test, y_test) if x_test is not None and y_test is not None else None,
        tuple(classes),
    )


def _as_float(x: np.ndarray, y: np.ndarray) -> Pair:
    """uint8 (memory-mapped or not) -> float32 /255 (in place on the copy: one float array at a time)."""
    out = x.astype(np.float32)
    out /= 255.0
    return out, np.array(y, dtype=np.int64)


class _Bar:
    """A Rich progress bar over the headers then the decoding, shown for large folders only."""

    def __init__(self, total: int, root: Path) -> None:
        self.total, self.root = total, root
        self._progress: Any = None
        self._task: Any = None

    def __enter__(self) -> _Bar:
        from capsctl._console import progress, quiet

        if self.total >= PROGRESS_MIN and not quiet():
            self._progress = progress()
            self._progress.__enter__()
            self.start("reading headers")
        return self

    def start(self, what: str) -> None:
        if self._progress is not None:
            if self._task is not None:
                self._progress.remove_task(self._task)
            self._task = self._progress.add_task(f"{self.root.name}: {what}", total=self.total)

    def advance(self) -> None:
        if self._progress is not None:
            self._progress.advance(self._task)

    def __exit__(self, *exc: object) -> None:
        if self._progress is not None:
            self._progress.__exit__(*exc)


def _gray_palette(im: Any) -> bool:
    """A palette image whose colours are all grays (r = g = b): a gray image stored with a palette, as
    some tools save 8-bit gray. Read from the header, nothing decoded."""
    if im.mode not in ("P", "PA"):
        return False
    palette = getattr(im, "palette", None)  # (the PLTE chunk, read at open; getpalette() decodes the image)
    mode = getattr(palette, "mode", "")
    raw = getattr(palette, "palette", b"")
    if mode not in ("RGB", "RGBA") or not isinstance(raw, bytes | bytearray) or not raw:
        return False  # no readable palette: taken as colour, as before
    entries = np.frombuffer(bytes(raw[: len(raw) - len(raw) % len(mode)]), np.uint8).reshape(-1, len(mode))
    return bool((entries[:, :3] == entries[:, :1]).all())


def _gray_stored_as_rgba(im: Any) -> bool:
    """A 16-bit gray+alpha PNG: Pillow opens it as RGBA (r = g = b, from its 'LA;16B' raw mode), so its
    mode alone made a folder of them a colour set. Read from the header, nothing decoded."""
    tile = getattr(im, "tile", None) or []  # each (codec, box, offset, raw mode)
    return im.mode == "RGBA" and len(tile) > 0 and str(tile[0][3]).startswith("LA;")


def _header(f: _File, bar: _Bar) -> _Entry:
    from capsctl.data.images import orientation

    with _open(Path(f.path)) as im:
        w, h = im.size
        if h * w > MAX_PIXELS:
            raise CapsctlError(f"{f.path}: image is {h}x{w}, over the limit of {MAX_PIXELS:,} pixels")
        turn = orientation(im)
        if turn >= 5:  # (stored on its side: upright, its height is the stored width)
            h, w = w, h
        gray = im.mode in _GRAY_MODES or _gray_palette(im) or _gray_stored_as_rgba(im)
        entry = _Entry(Path(f.path), f.label, (h, w), gray, turn)
    bar.advance()
    return entry


def _read_all(
    entries: list[_Entry], gray: bool, image_size: tuple[int, int] | None, bar: _Bar
) -> tuple[np.ndarray, np.ndarray]:
    """uint8 (N, H, W, C) images and int64 labels; every entry has one size here (or image_size)."""
    mode = "L" if gray else "RGB"
    h, w = image_size if image_size is not None else entries[0].size
    x = np.empty((len(entries), h, w, 1 if gray else 3), np.uint8)  # filled in place: no second copy
    from capsctl.data.images import upright

    for i, e in enumerate(entries):
        with _open(e.path) as im:
            try:
                im.load()
                conv = _decoded(upright(im, e.turn), e.path, mode)
            except CapsctlError:
                raise
            except Exception as ex:
                raise CapsctlError(f"{e.path}: truncated or corrupt image ({first_line(ex)})") from None
        if image_size is not None:
            conv = fit_pad(conv, image_size)
        x[i] = np.asarray(conv, dtype=np.uint8).reshape(x.shape[1:])
        bar.advance()
    return x, np.array([e.label for e in entries], np.int64)


def _decoded(im: Any, path: Path, mode: str) -> Any:
    """A loaded image as an 8-bit Pillow image of `mode` ('L' or 'RGB') with the pixels `predict` reads
    from the same file (capsctl.data.images.pil_pixels): Pillow's own convert where it is exact, else
    16-bit gray rescaled (convert would clip it to 0/255) and alpha composited (convert would drop it:
    black ink on a transparent sheet would train as an all-black image)."""
    from PIL import Image

    if im.mode in _PLAIN_MODES and "transparency" not in im.info:
        return im.convert(mode)
    from capsctl.data.images import pil_pixels

    x = pil_pixels(im, path, 1 if mode == "L" else 3)
    return Image.fromarray(np.clip(x * 255 + 0.5, 0, 255).astype(np.uint8))


def fit_pad(im: Any, size: tuple[int, int]) -> Any:
    """Scale a Pillow image to fit (height, width) with its aspect kept, centred on its background: white
    for a gray image whose border is light (dark ink on paper), else black.

    (Black bars beside a white page made most of a light image's border black: the model then lost its
    `background: "light"`, and `predict --invert auto` turned every image it was given.)"""
    from PIL import Image

    h, w = size
    iw, ih = im.size
    scale = min(h / ih, w / iw)
    nw, nh = max(1, round(iw * scale)), max(1, round(ih * scale))
    resized = im.resize((nw, nh), Image.Resampling.BILINEAR) if (nw, nh) != (iw, ih) else im
    # (decided on the scaled image, as `predict --fit` decides: not a float copy of a whole photo per image)
    fill = pad_value(np.asarray(resized, np.float32) / 255.0) * 255 if resized.mode == "L" else 0
    canvas = Image.new(im.mode, (w, h), fill)
    canvas.paste(resized, ((w - nw) // 2, (h - nh) // 2))
    return canvas


def pad_value(image: np.ndarray) -> int:
    """What an image is padded with, 0..1 values in: 1 (white) for a gray image (H, W) whose border is
    light, else 0 (black; colour images are padded with black, as they are never inverted)."""
    from capsctl.data.images import is_light_background

    return 1 if image.ndim == 2 and is_light_background(image) else 0
