"""Read one user image (PNG, JPEG, BMP, ... or a .npy array) as an MNIST-like gray image.

The result is float32 (H, W) in [0, 1], white digits on black as in MNIST. Rules (also in
`capsctl inspect --help`):

- Image files are read by Pillow (PNG, JPEG, BMP, GIF, TIFF, WebP, PPM/PGM; first frame only).
  Colour becomes gray with ITU-R 601 luma (Pillow's 'L' weights); 8-bit values are /255, 16-bit
  /65535. Palette images go through RGBA so a transparent palette entry counts as transparent.
- EXIF orientation (JPEG, WebP, TIFF; a PNG's when its eXIf chunk precedes the pixels): the image is
  turned upright as a viewer shows it (a phone's portrait photo is stored on its side; Pillow itself
  turns a TIFF as it decodes it).
- Alpha: the image is composited on the background that contrasts with its ink (black ink on a
  transparent sheet goes onto white, white ink onto black), so a transparent background never hides
  the digit; `--invert auto` then brings it to white on black.
- `.npy` (read with allow_pickle=False, header checked before the data is read): (H, W), or
  channels-last (H, W, C) with C = 1 (gray), 3 (RGB) or 4 (RGBA), or (1, H, W) (one image with a
  leading axis). Other 3-D shapes, e.g. a stack (N, H, W), are refused. uint8 is /255, uint16
  /65535, bool is 0/1, other integers must lie in 0..255 (/255) or 0..65535 (/65535); floats must be
  finite, in [0, 1] (used as is; -0.1 to 1.1, a resampling's overshoot, clipped to it) or in [0, 255]
  (divided by 255).
- invert: 'auto' inverts a gray image whose border is light (median > 0.5) and never a colour one
  (a colour model learned its images as they are: photos on light backgrounds stay as they are);
  for a model trained on dark ink on light gray images (its spec's background 'light'), 'auto'
  inverts a gray image whose border is dark instead; 'yes' always, 'no' never.
- resize: stretched to (height, width), or with `fit` scaled to fit inside it, aspect kept, and padded
  with its background (after inverting: white for a gray image with a light border, else black), as
  `train --image-size` reads an image folder.
- Images over MAX_PIXELS pixels are refused from their header, before anything is decoded.

Every problem is a CapsctlError naming the file; nothing else escapes (the loader is fuzzed).
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from capsctl._io import read_user_file
from capsctl.choices import INVERT_CHOICES
from capsctl.errors import CapsctlError, first_line, reraise_interrupt

if TYPE_CHECKING:
    from capsctl.model.spec import ModelSpec

MAX_PIXELS = 4096 * 4096  # far beyond what the model can route in memory; refuses decompression bombs
MAX_SIDE = 65535
PIL_FORMATS = ("PNG", "JPEG", "BMP", "GIF", "TIFF", "WEBP", "PPM")
_NPY_MAGIC = b"\x93NUMPY"
_CORRUPT = "corrupt data"  # what a decoder error without text is called
_LUMA = (0.299, 0.587, 0.114)  # ITU-R 601-2, as Pillow's convert('L')
# float values from -0.1 to 1.1 are a 0..1 image, clipped: a resampling's overshoot (a 0..255 float image
# whose brightest pixel is under 1.1 of 255 is black either way); a zero-centred image (-0.5..0.5) is
# still refused, not half erased
FLOAT_OVERSHOOT = 0.1


def load_image(
    path: str | os.PathLike[str],
    invert: str = "auto",
    resize: tuple[int, int] | None = None,
    *,
    spec: ModelSpec | None = None,
    max_pixels: int = MAX_PIXELS,
    channels: int = 1,
    fit: bool = False,
) -> np.ndarray:
    """Float32 (H, W) in [0, 1], white on black; `resize` is (height, width).

    `fit`: scale to fit inside `resize` with the aspect kept and pad with the image's background,
    centred (as `train --image-size` reads an image folder), instead of stretching to it.

    `channels=3` keeps colour: float32 (H, W, 3) RGB (a gray image in all three; alpha composited
    as for gray, on the background that contrasts with the ink's luma; inverted as a whole).

    With `spec`, also refuse an image too small for the model's trunk (after resizing).
    """

    p = Path(path)
    if fit and resize is None:
        raise CapsctlError("--fit scales to fit the --resize size: give --resize HxW too")
    if channels not in (1, 3):
        raise CapsctlError(f"images are read with 1 (gray) or 3 (RGB) channels, not {channels}")
    if invert not in INVERT_CHOICES:
        raise CapsctlError(f"--invert must be one of {', '.join(INVERT_CHOICES)}, got {invert!r}")
    if resize is not None:
        _check_resize(*resize, max_pixels)
    head = _read_head(p)
    try:
        if head.startswith(_NPY_MAGIC):
            with warnings.catch_warnings():
                # numpy parses the header with Python's tokenizer: a damaged one can raise a SyntaxWarning
                warnings.simplefilter("ignore")
                gray = _load_npy(p, max_pixels, channels)
        elif p.suffix.lower() == ".npy":
            raise CapsctlError(f"{p}: not a .npy file (no NumPy header)")
        else:
            gray = _load_pil(p, max_pixels, channels)
        light_model = spec is not None and spec.background == "light"
        gray = _finish(gray, p, invert, resize, light_model=light_model, fit=fit)
    except CapsctlError:
        raise
    except MemoryError:
        raise CapsctlError(f"{p}: out of memory while reading the image") from None
    except Exception as e:  # a decoder's own error on a corrupt file: one line, never a traceback
        reraise_interrupt(e)
        reason = f"{type(e).__name__}: {first_line(e, _CORRUPT)}"
        raise CapsctlError(f"{p}: cannot read the image ({reason})") from None
    if spec is not None:
        try:
            spec.trunk_grid(*gray.shape[:2])
            if spec.head == "capsule":
                spec.capsule_grid(*gray.shape[:2])  # (primary capsules need their kernel's window too)
        except CapsctlError as e:
            from capsctl.model.fit import resize_hint

            raise CapsctlError(
                f"{p}: {e} (at least {spec.min_image_size()} pixels a side; {resize_hint(spec)})"
            ) from None
    return np.ascontiguousarray(gray, dtype=np.float32)


def parse_size(text: str) -> tuple[int, int]:
    """'HxW' (or one number N for NxN) -> (height, width)."""
    parts = text.lower().replace("×", "x").split("x")
    try:
        nums = [int(x) for x in parts]
    except ValueError:
        nums = []
    if len(nums) == 1:
        nums = nums * 2
    if len(nums) != 2 or min(nums) < 1:
        raise CapsctlError(f"--resize must be HxW with positive integers (e.g. 28x28), got {text!r}")
    _check_resize(nums[0], nums[1], MAX_PIXELS)  # once, here: per image it was one error row each
    return nums[0], nums[1]


def _check_resize(rh: int, rw: int, max_pixels: int) -> None:
    if not (1 <= rh <= MAX_SIDE and 1 <= rw <= MAX_SIDE) or rh * rw > max_pixels:
        raise CapsctlError(
            f"--resize {rh}x{rw}: each side must be 1..{MAX_SIDE} and at most {max_pixels} pixels in all"
        )


# -- reading ----------------------------------------------------------------------------------



def _read_head(p: Path) -> bytes:
    head = read_user_file(p, "an image or .npy file", limit=16)
    if not head:
        raise CapsctlError(f"{p}: empty file")
    return head


def _check_budget(p: Path, h: int, w: int, max_pixels: int) -> None:
    if h < 1 or w < 1:
        raise CapsctlError(f"{p}: image has no pixels ({h}x{w})")
    if h * w > max_pixels or h > MAX_SIDE or w > MAX_SIDE:
        raise CapsctlError(
            f"{p}: image is {h}x{w} = {h * w:,} pixels, over the limit of {max_pixels:,} (refused before "
            "decoding)"
        )


def _load_pil(p: Path, max_pixels: int, channels: int = 1) -> np.ndarray:
    import warnings

    from PIL import Image, UnidentifiedImageError

    with warnings.catch_warnings():
        # a DecompressionBombWarning must not leak through as a warning, we refuse such files anyway;
        # other decoder warnings (e.g. TIFF "Corrupt EXIF data") would print multi-line noise: silence them
        warnings.simplefilter("ignore")
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        try:
            im = Image.open(p, formats=list(PIL_FORMATS))
        except UnidentifiedImageError:
            raise CapsctlError(
                f"{p}: not an image (PNG, JPEG, BMP, GIF, TIFF, WebP, PPM) nor a .npy array"
            ) from None
        except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
            # Pillow's own check (from the header) fired first; say it in our words
            import re

            m = re.search(r"\((\d+) pixels\)", str(e))
            size = f"{int(m.group(1)):,} pixels" if m else "too many pixels"
            raise CapsctlError(
                f"{p}: image has {size}, over the limit of {max_pixels:,} (refused before decoding)"
            ) from None
        im = _tiff_to_turn_as_decoded(im, p)
        with im:
            w, h = im.size
            _check_budget(p, h, w, max_pixels)  # from the header: nothing is decoded yet
            turn = orientation(im)
            try:
                im.seek(0)
                im.load()
            except (OSError, SyntaxError, ValueError, EOFError) as e:
                raise CapsctlError(f"{p}: truncated or corrupt image ({first_line(e, _CORRUPT)})") from None
            return pil_pixels(upright(im, turn), p, channels)


def _tiff_to_turn_as_decoded(im: Any, p: Path) -> Any:
    """`im`, or for an uncompressed TIFF stored on its side (orientation 5 to 8) the file opened again to
    be decoded by libtiff: Pillow's own raw decoder filled the upright size with the stored rows, a
    sheared image (libtiff's turns it upright, as Pillow does for every compressed TIFF)."""
    if im.format != "TIFF" or getattr(im, "use_load_libtiff", True):
        return im
    if im.tag_v2.get(0x0112) not in (5, 6, 7, 8):
        return im
    from PIL import Image, TiffImagePlugin

    im.close()
    before = TiffImagePlugin.READ_LIBTIFF  # (read as the file is opened; put back at once)
    TiffImagePlugin.READ_LIBTIFF = True
    try:
        return Image.open(p, formats=["TIFF"])
    finally:
        TiffImagePlugin.READ_LIBTIFF = before


# EXIF orientation -> the Pillow transpose that turns the stored pixels upright (as ImageOps.exif_transpose)
_UPRIGHT = {2: "FLIP_LEFT_RIGHT", 3: "ROTATE_180", 4: "FLIP_TOP_BOTTOM", 5: "TRANSPOSE", 6: "ROTATE_270",
            7: "TRANSVERSE", 8: "ROTATE_90"}


def orientation(im: Any) -> int:
    """An opened (not yet decoded) Pillow image's EXIF orientation, 1 (as stored) when it has none.

    Read before decoding, so an image folder's header pass knows each image's upright size: a PNG's eXIf
    chunk after its pixels would need the whole file decoded, and is not looked for (rare; 1)."""
    if im.format == "TIFF" or (im.format == "PNG" and "exif" not in im.info):
        return 1  # (Pillow turns a TIFF upright itself as it decodes it: turned again, it was wrong)
    try:
        value = int(im.getexif().get(0x0112, 1))
    except Exception:  # a damaged EXIF block: the pixels are still the image
        return 1
    return value if value in _UPRIGHT else 1


def upright(im: Any, turn: int) -> Any:
    """The decoded image turned by its `orientation` (the image itself for 1)."""
    from PIL import Image

    return im.transpose(getattr(Image.Transpose, _UPRIGHT[turn])) if turn in _UPRIGHT else im


def pil_pixels(im: Any, p: Path, channels: int = 1) -> np.ndarray:
    """A loaded Pillow image as float64 in [0, 1]: (H, W) gray or (H, W, 3) RGB, by the rules in the
    module doc (16-bit and 32-bit gray rescaled, alpha composited on the background that contrasts with
    the ink). Image folders decode their files with it too, so training sees what `predict` sees."""
    return _pil_to_rgb(im, p) if channels == 3 else _pil_to_gray(im, p)


def _has_alpha(im: Any) -> bool:
    """An alpha channel, or a colour key (PNG tRNS: one gray value or RGB colour, or palette entries, is
    transparent; PNG optimisers write it), which Pillow's convert to RGBA turns into alpha. A keyed gray
    or RGB image read as stored was the key's colour where it should be background (a black 7 on a
    transparent sheet read all black)."""
    keyed = im.mode in ("1", "L", "RGB", "P") and "transparency" in im.info
    return keyed or im.mode in ("LA", "La", "PA", "RGBA", "RGBa")


def _pil_to_gray(im: Any, p: Path) -> np.ndarray:
    mode = im.mode
    if mode in ("I;16", "I;16L", "I;16B", "I;16N"):
        return np.asarray(im, dtype=np.float64) / 65535.0
    if mode in ("I", "F"):
        return _scale_values(np.asarray(im, dtype=np.float64), p, integer=mode == "I")
    has_alpha = _has_alpha(im)
    if mode == "1" and not has_alpha:
        return np.asarray(im.convert("L"), dtype=np.float64) / 255.0
    if mode == "L" and not has_alpha:
        return np.asarray(im, dtype=np.float64) / 255.0
    if has_alpha:
        rgba = np.asarray(im.convert("RGBA"), dtype=np.float64) / 255.0
        return _composite(_luma(rgba[..., :3]), rgba[..., 3])
    return _luma(np.asarray(im.convert("RGB"), dtype=np.float64) / 255.0)


def _pil_to_rgb(im: Any, p: Path) -> np.ndarray:
    mode = im.mode
    if mode in ("I;16", "I;16L", "I;16B", "I;16N", "I", "F", "1", "L"):
        return _gray_to_rgb(_pil_to_gray(im, p))
    if _has_alpha(im):
        rgba = np.asarray(im.convert("RGBA"), dtype=np.float64) / 255.0
        return _composite_rgb(rgba[..., :3], rgba[..., 3])
    return np.asarray(im.convert("RGB"), dtype=np.float64) / 255.0


def _gray_to_rgb(gray: np.ndarray) -> np.ndarray:
    return np.repeat(gray[..., None], 3, axis=2)


def _composite_rgb(rgb: np.ndarray, alpha: np.ndarray) -> np.ndarray:
    """Put an RGB+alpha image on the background that contrasts with its ink's luma (as `_composite`)."""
    gray = _luma(rgb)
    weight = float(alpha.sum())
    ink = float((gray * alpha).sum() / weight) if weight > 0 else 1.0
    background = 1.0 if ink < 0.5 else 0.0
    a = alpha[..., None]
    return np.asarray(rgb * a + background * (1.0 - a))


def _luma(rgb: np.ndarray) -> np.ndarray:
    r, g, b = _LUMA
    return rgb[..., 0] * r + rgb[..., 1] * g + rgb[..., 2] * b


def _composite(gray: np.ndarray, alpha: np.ndarray) -> np.ndarray:
    """Put a gray+alpha image on the background that contrasts with its ink (see module doc)."""

    weight = float(alpha.sum())
    ink = float((gray * alpha).sum() / weight) if weight > 0 else 1.0
    background = 1.0 if ink < 0.5 else 0.0
    return np.asarray(gray * alpha + background * (1.0 - alpha))


def _load_npy(p: Path, max_pixels: int, channels: int = 1) -> np.ndarray:
    fmt = np.lib.format
    try:
        with open(p, "rb") as f:
            version = fmt.read_magic(f)
            if version == (1, 0):
                shape, _, dtype = fmt.read_array_header_1_0(f)
            elif version == (2, 0):
                shape, _, dtype = fmt.read_array_header_2_0(f)
            else:
                raise CapsctlError(f"{p}: unsupported .npy format version {version[0]}.{version[1]}")
            data_start = f.tell()
    except CapsctlError:
        raise
    except Exception as e:
        raise CapsctlError(f"{p}: not a valid .npy file ({first_line(e, _CORRUPT)})") from None
    if dtype.hasobject:
        raise CapsctlError(
            f"{p}: the array holds Python objects (dtype {dtype}); only numeric arrays are read"
        )
    if dtype.names is not None or dtype.subdtype is not None or dtype.kind not in "biuf":
        raise CapsctlError(f"{p}: dtype {dtype} is not a number type (expected uint8, uint16, bool or float)")
    want = channels  # what the caller asked for; `channels` is now the file's
    h, w, channels = _npy_layout(p, tuple(shape))
    _check_budget(p, h, w, max_pixels)
    need = data_start + h * w * channels * dtype.itemsize
    if p.stat().st_size < need:
        raise CapsctlError(f"{p}: truncated .npy file ({p.stat().st_size} bytes, the header promises {need})")
    try:
        arr = np.load(p, allow_pickle=False)
    except ValueError as e:  # a data section shorter than the header says
        raise CapsctlError(f"{p}: truncated or corrupt .npy file ({first_line(e, _CORRUPT)})") from None
    arr = np.asarray(arr).reshape(h, w, channels)
    if arr.dtype.kind == "b":
        x = arr.astype(np.float64)
    elif arr.dtype == np.uint8:
        x = arr.astype(np.float64) / 255.0
    elif arr.dtype == np.uint16:
        x = arr.astype(np.float64) / 65535.0
    else:
        x = _scale_values(arr.astype(np.float64), p, integer=arr.dtype.kind in "iu")
    if want == 3:
        if channels == 1:
            return _gray_to_rgb(x[..., 0])
        return x if channels == 3 else _composite_rgb(x[..., :3], x[..., 3])
    if channels == 1:
        return x[..., 0]
    if channels == 3:
        return _luma(x)
    return _composite(_luma(x[..., :3]), x[..., 3])


def _npy_layout(p: Path, shape: tuple[int, ...]) -> tuple[int, int, int]:
    """(height, width, channels) of an accepted .npy shape (see module doc)."""
    if len(shape) == 2:
        return shape[0], shape[1], 1
    if len(shape) == 3:
        if shape[2] in (1, 3, 4):
            return shape[0], shape[1], shape[2]
        if shape[0] == 1:
            return shape[1], shape[2], 1
        raise CapsctlError(
            f"{p}: a 3-D array of shape {shape} is not one image (expected (H, W), (H, W, C) with C = 1, 3 "
            "or 4, "
            f"or (1, H, W)); save a single image, e.g. np.save(path, stack[0])"
        )
    raise CapsctlError(
        f"{p}: a {len(shape)}-D array of shape {shape} is not one image (expected (H, W) or (H, W, C))"
    )


def _scale_values(x: np.ndarray, p: Path, integer: bool) -> np.ndarray:
    """Bring integer or float pixel values to [0, 1] by the rules in the module doc."""

    if x.size == 0:
        raise CapsctlError(f"{p}: image has no pixels")
    if not np.isfinite(x).all():
        raise CapsctlError(f"{p}: the array holds NaN or infinite values")
    lo, hi = float(x.min()), float(x.max())
    if not integer and lo >= -FLOAT_OVERSHOOT and hi <= 1.0 + FLOAT_OVERSHOOT:
        # (a resampled 0..1 image overshoots a little at edges: 1.001 was divided by 255, a black image)
        return np.clip(x, 0.0, 1.0)
    if lo < 0:
        raise CapsctlError(f"{p}: negative pixel values (min {lo:g}); expected 0..1, 0..255 or 0..65535")
    if hi <= 255.0:
        return x / 255.0
    if integer and hi <= 65535.0:
        return x / 65535.0
    limit = "0..65535" if integer else "0..1 or 0..255"
    raise CapsctlError(f"{p}: pixel values up to {hi:g}; expected {limit}")


# -- after reading ------------------------------------------------------------------------------


def _finish(
    gray: np.ndarray,
    p: Path,
    invert: str,
    resize: tuple[int, int] | None,
    light_model: bool = False,
    fit: bool = False,
) -> np.ndarray:
    gray = np.clip(np.asarray(gray, dtype=np.float64), 0.0, 1.0)
    if gray.ndim not in (2, 3) or gray.size == 0:
        raise CapsctlError(f"{p}: image has no pixels")
    # 'auto' brings a gray image to the background the model trained on (light_model: dark ink on light;
    # else MNIST's white ink on black); a colour model learned its images as they are
    flip = gray.ndim == 2 and is_light_background(gray) != light_model
    if invert == "yes" or (invert == "auto" and flip):
        gray = 1.0 - gray
    if resize is not None and resize != gray.shape[:2]:
        # (after inverting: the padding is the image's background as the model sees it, as in its folders)
        gray = _fit_pad(gray, resize) if fit else _resize_channels(gray, resize)
    return gray.astype(np.float32)


def _resize_channels(x: np.ndarray, size: tuple[int, int], bilinear: bool = False) -> np.ndarray:
    if x.ndim == 2:
        return _resize(x, size, bilinear)
    return np.stack([_resize(x[..., k], size, bilinear) for k in range(x.shape[2])], axis=2)


def _fit_pad(x: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Scale (H, W[, C]) to fit inside `size` with its aspect kept, centred on its background (white for a
    gray image with a light border, else black): the arithmetic, the filter (Pillow's bilinear) and the
    padding of capsctl.data.folders.fit_pad, so an image is what training's folder images were, but for
    their rounding to 8 bits."""
    from capsctl.data.folders import pad_value

    h, w = size
    ih, iw = x.shape[:2]
    scale = min(h / ih, w / iw)
    nh, nw = max(1, round(ih * scale)), max(1, round(iw * scale))
    inner = _resize_channels(x, (nh, nw), bilinear=True) if (nh, nw) != (ih, iw) else x
    out = np.full((h, w, *x.shape[2:]), float(pad_value(inner)), dtype=np.float64)  # (as fit_pad decides)
    top, left = (h - nh) // 2, (w - nw) // 2
    out[top : top + nh, left : left + nw] = inner
    return out


def is_light_background(gray: np.ndarray) -> bool:
    """True when the image's border (the outer tenth, at least one pixel) is mostly light."""

    return bool(light_backgrounds(gray[None])[0])


def light_backgrounds(gray: np.ndarray) -> np.ndarray:
    """For (N, H, W) gray images in [0, 1]: whether each one's border (the outer tenth, at least one
    pixel) is mostly light (median > 0.5)."""

    n, h, w = gray.shape
    k = max(1, min(h, w) // 10)
    border = np.concatenate(
        [gray[:, :k].reshape(n, -1), gray[:, -k:].reshape(n, -1), gray[:, :, :k].reshape(n, -1),
         gray[:, :, -k:].reshape(n, -1)],
        axis=1,
    )
    return np.median(border, axis=1) > 0.5


def data_background(images: np.ndarray, sample: int = 2000) -> str | None:
    """A model spec's `background` for its training images (N, H, W, C): 'light' when they are gray and
    most of them (up to `sample` of them, evenly spaced) have a light border, else None."""

    if images.ndim != 4 or images.shape[3] != 1 or len(images) == 0:
        return None
    step = max(1, len(images) // sample)
    light = light_backgrounds(np.asarray(images[::step, :, :, 0], dtype=np.float32))
    return "light" if light.mean() > 0.5 else None


def _resize(gray: np.ndarray, size: tuple[int, int], bilinear: bool = False) -> np.ndarray:
    from PIL import Image

    h, w = size
    # 'F' mode keeps full precision; a box filter when shrinking averages strokes instead of dropping them
    # (`bilinear`: Pillow's bilinear either way, as image folders are scaled; it too averages when shrinking)
    shrink = h < gray.shape[0] or w < gray.shape[1]
    im = Image.fromarray(gray.astype(np.float32))  # mode F
    out = im.resize((w, h), Image.Resampling.BOX if shrink and not bilinear else Image.Resampling.BILINEAR)
    return np.clip(np.asarray(out, dtype=np.float64), 0.0, 1.0)
