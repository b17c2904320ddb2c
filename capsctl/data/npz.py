"""A data set in one `.npz` file, the keras.datasets convention: x_train, y_train, x_test, y_test.

Images are uint8, (N, H, W) or (N, H, W, C) with C = 1 or 3; labels are integers (N,) (or (N, 1)).
An optional `class_names` holds one string per class (else the classes are 0..max label); every class
must have training images. Read with allow_pickle=False; every problem is one CapsctlError naming the
file and the key.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from capsctl.errors import CapsctlError

KEYS = ("x_train", "y_train", "x_test", "y_test")


def load_npz(
    path: Path, image_size: tuple[int, int] | None = None
) -> tuple[tuple[np.ndarray, np.ndarray], tuple[np.ndarray, np.ndarray], tuple[str, ...]]:
    """((train images, labels), (test images, labels), class names); images float32 (N, H, W, C)."""
    try:
        with open(path, "rb") as f:
            head = f.read(6)
    except OSError as e:
        raise CapsctlError(f"{path}: cannot read it ({e.strerror or e})") from None
    if not head.startswith(b"PK") and not head.startswith(b"\x93NUMPY"):
        # (numpy takes any other file for a pickle and says so, advising to load it unsafely)
        raise CapsctlError(f"{path}: not an .npz archive (not a zip file); expected {', '.join(KEYS)}")
    try:
        archive = np.load(path, allow_pickle=False)
    except MemoryError:
        raise
    except Exception as e:  # numpy's reader on a damaged file: BadZipFile, zlib.error, a header's TokenError…
        raise CapsctlError(f"{path}: not a readable .npz archive ({_first_line(e)})") from None
    if not isinstance(archive, np.lib.npyio.NpzFile):
        raise CapsctlError(f"{path}: a single .npy array, expected an .npz archive with {', '.join(KEYS)}")
    with archive:
        for key in KEYS:
            if key not in archive.files:
                raise CapsctlError(f"{path}: missing key {key!r} (an .npz needs {', '.join(KEYS)})")
        try:
            arrays = {key: archive[key] for key in KEYS}
            names = archive["class_names"] if "class_names" in archive.files else None
        except ValueError as e:  # an object array (needs pickle) or a damaged member
            raise CapsctlError(f"{path}: cannot read the arrays ({_first_line(e)})") from None
        except MemoryError:
            raise
        except Exception as e:  # a damaged member: BadZipFile, zlib.error, tokenize.TokenError in its header…
            raise CapsctlError(f"{path}: corrupt .npz archive ({_first_line(e)})") from None
    x_train = _images(path, "x_train", arrays["x_train"])
    x_test = _images(path, "x_test", arrays["x_test"])
    y_train = _labels(path, "y_train", arrays["y_train"], len(x_train), "x_train")
    y_test = _labels(path, "y_test", arrays["y_test"], len(x_test), "x_test")
    if image_size is None and x_train.shape[1:] != x_test.shape[1:]:
        raise CapsctlError(
            f"{path}: x_train images are {'x'.join(map(str, x_train.shape[1:]))} but x_test images are "
            f"{'x'.join(map(str, x_test.shape[1:]))}; give --image-size HxW to resize them"
        )
    if x_train.shape[3] != x_test.shape[3]:
        raise CapsctlError(f"{path}: x_train has {x_train.shape[3]} channel(s), x_test {x_test.shape[3]}")
    top = int(max(y_train.max(initial=0), y_test.max(initial=0)))
    if names is None and top >= MAX_CLASSES:  # (an id, not a class index: a billion class names else)
        raise CapsctlError(
            f"{path}: label {top:,}: labels are class indices 0..N-1 (at most {MAX_CLASSES:,} classes)"
        )
    if names is not None:
        if names.ndim != 1 or names.dtype.kind not in "U" or len(names) < 1:
            raise CapsctlError(f"{path}: class_names must be a 1-D array of strings, got {names.dtype} "
                               f"{list(names.shape)}")
        classes = tuple(str(n) for n in names)
        if len(set(classes)) != len(classes) or not all(classes):  # (a class is found by its name)
            raise CapsctlError(
                f"{path}: class_names must be distinct, non-empty strings, got {list(classes)[:12]}"
            )
        if top >= len(classes):
            raise CapsctlError(f"{path}: label {top} is out of range for {len(classes)} class_names")
    else:
        classes = tuple(str(j) for j in range(top + 1))
    if len(classes) < 2:
        raise CapsctlError(f"{path}: the labels name only one class; a classifier needs two or more")
    scheme = f"{len(classes)} class_names" if names is not None else f"labels 0..{top}"
    require_training_images(f"{path}: y_train", y_train, classes, scheme)
    if image_size is not None:
        x_train, x_test = _resize(x_train, image_size), _resize(x_test, image_size)
    return (
        (x_train.astype(np.float32) / 255.0, y_train),
        (x_test.astype(np.float32) / 255.0, y_test),
        classes,
    )


MAX_CLASSES = 65_536  # labels are class indices; a larger one is an id or a stray value


def require_training_images(where: str, y_train: np.ndarray, classes: tuple[str, ...], scheme: str) -> None:
    """Refuse classes that no training image teaches (an output that is never trained; often a stray
    label, e.g. 12 among digits 0..9, or labels counted from 1)."""
    untrained = sorted(set(range(len(classes))) - set(np.unique(y_train).tolist()))
    if untrained:
        shown = ", ".join(classes[j] for j in untrained[:10])
        more = f" and {len(untrained) - 10} more" if len(untrained) > 10 else ""
        raise CapsctlError(
            f"{where} has no image of class {shown}{more} ({scheme}); every class needs training images"
        )


def _images(path: Path, key: str, x: np.ndarray) -> np.ndarray:
    if x.dtype != np.uint8:
        raise CapsctlError(f"{path}: {key} has dtype {x.dtype}, expected uint8 (0..255)")
    if x.ndim == 3:
        x = x[..., None]
    if x.ndim != 4 or x.shape[3] not in (1, 3):
        raise CapsctlError(
            f"{path}: {key} has shape {list(x.shape)}, expected (N, H, W) or (N, H, W, C) with C = 1 or 3"
        )
    if min(x.shape) < 1:
        raise CapsctlError(f"{path}: {key} holds no images (shape {list(x.shape)})")
    return x


def _labels(path: Path, key: str, y: np.ndarray, n: int, images: str) -> np.ndarray:
    if y.ndim == 2 and y.shape[1] == 1:
        y = y[:, 0]
    if y.ndim != 1 or y.dtype.kind not in "iu":
        raise CapsctlError(
            f"{path}: {key} must be integer labels of shape (N,), got {y.dtype} {list(y.shape)}"
        )
    if len(y) != n:
        raise CapsctlError(f"{path}: {images} has {n} images but {key} has {len(y)} labels")
    if len(y) and int(y.min()) < 0:
        raise CapsctlError(
            f"{path}: {key} holds label {int(y.min())}, out of range (labels are 0..classes-1)"
        )
    return y.astype(np.int64)


def _resize(x: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    from PIL import Image

    from capsctl.data.folders import fit_pad

    out = np.empty((len(x), size[0], size[1], x.shape[3]), np.uint8)
    for i, img in enumerate(x):
        im = Image.fromarray(img[..., 0] if x.shape[3] == 1 else img)
        arr = np.asarray(fit_pad(im, size), np.uint8)
        out[i] = arr[..., None] if x.shape[3] == 1 else arr
    return out


def _first_line(e: BaseException) -> str:
    return (str(e).splitlines() or [type(e).__name__])[0][:200]
