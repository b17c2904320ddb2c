"""capsctl.images.load_image: every accepted kind of input, and every refusal as a CapsctlError."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from capsctl.data.images import MAX_PIXELS, is_light_background, load_image, parse_size
from capsctl.errors import CapsctlError
from capsctl.model.spec import ModelSpec

from ._helpers import huge_png


def digit(h: int = 28, w: int = 28) -> np.ndarray:
    """A white bar on black, uint8, MNIST-like."""
    a = np.zeros((h, w), np.uint8)
    a[h // 4 : 3 * h // 4, w // 2 - 2 : w // 2 + 2] = 255
    a[h // 2, w // 4 : 3 * w // 4] = 128
    return a


# -- accepted inputs ----------------------------------------------------------------------------

def test_gray_png_is_read_exactly_and_not_inverted(tmp_path):
    a = digit()
    Image.fromarray(a).save(tmp_path / "d.png")
    x = load_image(tmp_path / "d.png")
    assert x.dtype == np.float32 and x.shape == (28, 28)
    np.testing.assert_allclose(x, a / 255.0, atol=1e-6)


def test_light_background_is_inverted_automatically(tmp_path):
    a = digit()
    Image.fromarray(255 - a).save(tmp_path / "ink.png")
    np.testing.assert_allclose(load_image(tmp_path / "ink.png"), a / 255.0, atol=1e-6)
    np.testing.assert_allclose(load_image(tmp_path / "ink.png", invert="no"), 1 - a / 255.0, atol=1e-6)
    Image.fromarray(a).save(tmp_path / "d.png")
    np.testing.assert_allclose(load_image(tmp_path / "d.png", invert="yes"), 1 - a / 255.0, atol=1e-6)


def test_auto_never_inverts_a_colour_image(tmp_path):
    # a photo on a light background, read for a colour model: kept as it is (auto is the gray MNIST rule)
    rgb = np.full((20, 24, 3), 230, np.uint8)
    rgb[5:15, 6:18] = (200, 30, 40)
    Image.fromarray(rgb).save(tmp_path / "photo.png")
    np.testing.assert_allclose(load_image(tmp_path / "photo.png", channels=3), rgb / 255.0, atol=1e-6)
    np.testing.assert_allclose(load_image(tmp_path / "photo.png", channels=3, invert="yes"), 1 - rgb / 255.0,
                               atol=1e-6)
    # the same file for a gray model is still inverted by auto
    assert load_image(tmp_path / "photo.png").mean() < 0.5


def test_light_background_rule():
    assert is_light_background(np.ones((5, 7)))
    assert not is_light_background(np.zeros((5, 7)))
    img = np.zeros((30, 30))
    img[5:25, 5:25] = 1.0  # a big bright digit inside a dark border stays as it is
    assert not is_light_background(img)
    assert is_light_background(np.ones((1, 1)))


def test_rgb_becomes_luma(tmp_path):
    rgb = np.zeros((10, 12, 3), np.uint8)
    rgb[..., 0] = 200
    rgb[2:8, 3:9, 1] = 255
    Image.fromarray(rgb).save(tmp_path / "c.png")
    expected = (rgb[..., 0] * 0.299 + rgb[..., 1] * 0.587 + rgb[..., 2] * 0.114) / 255.0
    np.testing.assert_allclose(load_image(tmp_path / "c.png", invert="no"), expected, atol=1e-5)


@pytest.mark.parametrize("suffix", [".png", ".jpg", ".webp", ".tif", "-lzw.tif"])
@pytest.mark.parametrize("turn", [3, 6, 8])
def test_exif_orientation_turns_the_image_upright(tmp_path, suffix, turn):
    """A phone stores a portrait photo on its side and says so in EXIF; viewers (and people) see it
    upright. Pillow turns a TIFF itself as it decodes it (turned again, it was wrong), but an uncompressed
    one stored on its side (6, 8) it decoded sheared: it is read through libtiff, which turns it."""
    a = digit(30, 20)
    stored = {3: np.rot90(a, 2), 6: np.rot90(a, 1), 8: np.rot90(a, -1)}[turn]
    exif = Image.Exif()
    exif[0x0112] = turn
    path = tmp_path / f"d{suffix}"
    if suffix.endswith(".tif"):
        Image.fromarray(np.ascontiguousarray(stored)).save(
            path, tiffinfo={0x0112: turn}, compression="tiff_lzw" if "lzw" in suffix else None
        )
    else:
        Image.fromarray(np.ascontiguousarray(stored)).save(path, exif=exif, quality=100,
                                                           lossless=suffix == ".webp")
    x = load_image(path)
    assert x.shape == (30, 20)
    assert np.abs(x - a / 255.0).max() < (0.25 if suffix == ".jpg" else 1e-6)


def test_fit_keeps_the_aspect_and_pads_as_an_image_folder_does(tmp_path):
    # a tall digit: stretched it would be twice as wide as the one training saw from the folder
    a = digit(56, 28)
    Image.fromarray(a).save(tmp_path / "tall.png")
    x = load_image(tmp_path / "tall.png", resize=(28, 28), fit=True)
    assert x.shape == (28, 28)
    np.testing.assert_array_equal(x[:, :7], 0.0)  # 14 columns wide, centred
    np.testing.assert_array_equal(x[:, 21:], 0.0)
    from capsctl.data.folders import fit_pad

    with Image.open(tmp_path / "tall.png") as im:
        trained = np.asarray(fit_pad(im.convert("L"), (28, 28)), np.float64) / 255.0
    # the same digit in the same place, by the same filter: what training saw but for its 8-bit rounding
    assert np.abs(x - trained).max() <= 1 / 255
    stretched = load_image(tmp_path / "tall.png", resize=(28, 28))
    assert np.abs(stretched - trained).max() > 0.8
    # padding happens after inverting: a light-background photo gets the model's black, not white bars
    Image.fromarray(255 - a).save(tmp_path / "ink.png")
    np.testing.assert_allclose(load_image(tmp_path / "ink.png", resize=(28, 28), fit=True), x, atol=1e-6)
    # colour too
    Image.fromarray(np.repeat(a[:, :, None], 3, axis=2)).save(tmp_path / "rgb.png")
    rgb = load_image(tmp_path / "rgb.png", resize=(28, 28), fit=True, channels=3)
    assert rgb.shape == (28, 28, 3)
    np.testing.assert_allclose(rgb[..., 1], x, atol=1e-6)
    with pytest.raises(CapsctlError, match="--resize"):
        load_image(tmp_path / "tall.png", fit=True)


@pytest.mark.parametrize("ink", [0, 255])
def test_rgba_ink_on_transparent_ends_white_on_black(tmp_path, ink):
    a = digit()
    rgba = np.zeros((28, 28, 4), np.uint8)
    rgba[..., :3] = ink
    rgba[..., 3] = a  # the digit is the opaque part
    Image.fromarray(rgba).save(tmp_path / "t.png")
    np.testing.assert_allclose(load_image(tmp_path / "t.png"), a / 255.0, atol=1.5 / 255)


def test_palette_with_and_without_transparency(tmp_path):
    a = digit()
    im = Image.fromarray(a).convert("P")
    im.save(tmp_path / "p.png")
    np.testing.assert_allclose(load_image(tmp_path / "p.png"), a / 255.0, atol=1e-6)
    pal = Image.new("P", (6, 4), 0)
    pal.putpalette([255, 255, 255, 0, 0, 0] + [0] * 762)  # index 0 white (transparent), 1 black
    pal.putpixel((2, 1), 1)
    pal.putpixel((3, 2), 1)
    pal.info["transparency"] = 0
    pal.save(tmp_path / "pt.png", transparency=0)
    x = load_image(tmp_path / "pt.png")
    assert x[1, 2] == pytest.approx(1.0) and x[2, 3] == pytest.approx(1.0)  # black ink became white
    assert x.sum() == pytest.approx(2.0)


@pytest.mark.parametrize("mode", ["L", "RGB"])
def test_a_colour_key_is_transparency(tmp_path, mode):
    """PNG tRNS on a gray or RGB image (one value is transparent, as PNG optimisers write): a black digit
    on a transparent sheet of near-black was read as stored, an all-black image, and scored as noise."""
    ink = digit() > 127
    sheet = np.where(ink, 0, 1).astype(np.uint8)
    if mode == "L":
        Image.fromarray(sheet).save(tmp_path / "k.png", transparency=1)
    else:
        rgb = np.repeat(sheet[..., None], 3, axis=2)
        Image.fromarray(rgb).save(tmp_path / "k.png", transparency=(1, 1, 1))
    with Image.open(tmp_path / "k.png") as im:
        assert im.mode == mode and "transparency" in im.info
    np.testing.assert_allclose(load_image(tmp_path / "k.png"), ink.astype(np.float64), atol=1e-6)
    # in colour: the ink on the background that contrasts with it, as an RGBA image of it is read
    np.testing.assert_allclose(load_image(tmp_path / "k.png", channels=3)[..., 1], 1.0 - ink, atol=1e-6)


def test_sixteen_bit_png(tmp_path):
    a = (np.arange(30, dtype=np.uint16).reshape(5, 6) * 2000).astype(np.uint16)
    Image.fromarray(a).save(tmp_path / "w.png")
    np.testing.assert_allclose(load_image(tmp_path / "w.png", invert="no"), a / 65535.0, atol=1e-6)


@pytest.mark.parametrize("fmt", ["JPEG", "BMP"])
def test_jpeg_and_bmp(tmp_path, fmt):
    a = digit(40, 30)
    path = tmp_path / f"d.{fmt.lower()}"
    Image.fromarray(a).convert("RGB").save(path, format=fmt)
    x = load_image(path)
    assert x.shape == (40, 30)
    assert np.abs(x - a / 255.0).mean() < 0.02


def test_one_pixel_image_is_read_but_too_small_for_a_model(tmp_path):
    Image.fromarray(np.full((1, 1), 200, np.uint8)).save(tmp_path / "one.png")
    assert load_image(tmp_path / "one.png", invert="no").shape == (1, 1)
    with pytest.raises(CapsctlError, match=r"one\.png.*too small"):
        load_image(tmp_path / "one.png", spec=ModelSpec())
    assert load_image(tmp_path / "one.png", resize=(28, 28), spec=ModelSpec()).shape == (28, 28)


def test_resize_shrinks_with_a_box_filter(tmp_path):
    a = np.zeros((56, 56), np.uint8)
    a[:, :28] = 255
    Image.fromarray(a).save(tmp_path / "big.png")
    x = load_image(tmp_path / "big.png", resize=(28, 14))
    assert x.shape == (28, 14)
    np.testing.assert_allclose(x[:, :7], 1.0, atol=1e-6)
    np.testing.assert_allclose(x[:, 7:], 0.0, atol=1e-6)


@pytest.mark.parametrize(
    "array, expected",
    [
        (np.linspace(0, 1, 20, dtype=np.float32).reshape(4, 5), np.linspace(0, 1, 20).reshape(4, 5)),
        (np.arange(20, dtype=np.float64).reshape(4, 5, 1) * 10, np.arange(20).reshape(4, 5) * 10 / 255),
        (np.arange(20, dtype=np.uint8).reshape(1, 4, 5), np.arange(20).reshape(4, 5) / 255),
        (np.arange(20, dtype=np.uint16).reshape(4, 5) * 3000, np.arange(20).reshape(4, 5) * 3000 / 65535),
        (np.eye(4, 5, dtype=bool), np.eye(4, 5)),
        (np.arange(20, dtype=np.int32).reshape(4, 5), np.arange(20).reshape(4, 5) / 255),
    ],
)
def test_npy_gray_variants(tmp_path, array, expected):
    np.save(tmp_path / "a.npy", array)
    np.testing.assert_allclose(load_image(tmp_path / "a.npy", invert="no"), expected, atol=1e-6)


def test_npy_colour_and_alpha(tmp_path):
    rgb = np.zeros((6, 7, 3), np.uint8)
    rgb[2:4, 2:5] = (255, 255, 255)
    np.save(tmp_path / "rgb.npy", rgb)
    np.testing.assert_allclose(load_image(tmp_path / "rgb.npy"), (rgb[..., 0] == 255).astype(float),
                               atol=1e-6)
    rgba = np.zeros((6, 7, 4), np.float32)
    rgba[2:4, 2:5, 3] = 1.0  # black ink where opaque, transparent elsewhere
    np.save(tmp_path / "rgba.npy", rgba)
    np.testing.assert_allclose(load_image(tmp_path / "rgba.npy"), rgba[..., 3], atol=1e-6)


def test_parse_size():
    assert parse_size("28x14") == (28, 14)
    assert parse_size("32") == (32, 32)
    for bad in ("0x5", "axb", "1x2x3", "-3x4", ""):
        with pytest.raises(CapsctlError, match="--resize"):
            parse_size(bad)


# -- refused inputs -------------------------------------------------------------------------------

def test_not_an_image(tmp_path):
    (tmp_path / "notes.png").write_text("hello, not a picture\n")
    with pytest.raises(CapsctlError, match=r"notes\.png: not an image"):
        load_image(tmp_path / "notes.png")


def test_empty_and_missing_files_and_folders(tmp_path):
    (tmp_path / "empty.png").write_bytes(b"")
    with pytest.raises(CapsctlError, match=r"empty\.png: empty file"):
        load_image(tmp_path / "empty.png")
    with pytest.raises(CapsctlError, match="no such file"):
        load_image(tmp_path / "missing.png")
    with pytest.raises(CapsctlError, match="is a folder"):
        load_image(tmp_path)


def test_huge_image_refused_before_decoding(tmp_path):
    huge_png(tmp_path / "huge.png")
    assert (tmp_path / "huge.png").stat().st_size < 200_000
    with pytest.raises(CapsctlError,
                       match=r"huge\.png: image (is 20000x20000 = |has )400,000,000 pixels.*before decoding"):
        load_image(tmp_path / "huge.png")
    # header only below
    np.lib.format.open_memmap(tmp_path / "huge.npy", mode="w+", dtype=np.uint8, shape=(1, 1))
    header = {"descr": "|u1", "fortran_order": False, "shape": (20000, 20000)}
    with open(tmp_path / "huge.npy", "wb") as f:
        np.lib.format.write_array_header_1_0(f, header)
    with pytest.raises(CapsctlError, match=r"huge\.npy: image is 20000x20000.*before decoding"):
        load_image(tmp_path / "huge.npy")
    assert MAX_PIXELS < 20000 * 20000
    huge_png(tmp_path / "big.png", side=5000)  # under Pillow's own limit, over ours
    with pytest.raises(CapsctlError,
                       match=r"big\.png: image is 5000x5000 = 25,000,000 pixels, over the limit"):
        load_image(tmp_path / "big.png")


def test_truncated_png_and_jpeg(tmp_path):
    rng = np.random.default_rng(0)
    # incompressible, so half the file is half the data
    noisy = rng.integers(0, 256, (64, 64), dtype=np.uint8)
    Image.fromarray(noisy).save(tmp_path / "full.png")
    data = (tmp_path / "full.png").read_bytes()
    (tmp_path / "cut.png").write_bytes(data[: len(data) // 2])
    with pytest.raises(CapsctlError, match=r"cut\.png: truncated or corrupt"):
        load_image(tmp_path / "cut.png")
    Image.fromarray(noisy).save(tmp_path / "full.jpg", quality=95)
    data = (tmp_path / "full.jpg").read_bytes()
    (tmp_path / "cut.jpg").write_bytes(data[: len(data) // 2])
    with pytest.raises(CapsctlError, match=r"cut\.jpg"):
        load_image(tmp_path / "cut.jpg")


def test_a_float_image_overshooting_0_to_1_a_little_is_clipped_not_divided_by_255(tmp_path):
    """A resampled 0..1 image overshoots at its edges (1.001, -0.002): it was divided by 255, read as a
    black image, and scored as noise."""
    a = digit() / 255.0
    over = a * 1.002 - 0.001
    assert over.max() > 1.0 and over.min() < 0.0
    np.save(tmp_path / "over.npy", over)
    np.testing.assert_allclose(load_image(tmp_path / "over.npy", invert="no"), np.clip(over, 0, 1), atol=1e-6)
    np.save(tmp_path / "bytes.npy", a * 255.0)  # a 0..255 float image is still /255
    np.testing.assert_allclose(load_image(tmp_path / "bytes.npy", invert="no"), a, atol=1e-6)


@pytest.mark.parametrize(
    "array, match",
    [
        (np.zeros((5, 28, 28), np.float32), r"3-D array of shape \(5, 28, 28\) is not one image"),
        (np.zeros((2, 28, 28, 1), np.float32), "4-D array"),
        (np.zeros(28, np.float32), "1-D array"),
        (np.array([[0.1, np.nan]], np.float32), "NaN"),
        (np.array([[0.1, np.inf]], np.float64), "NaN or infinite"),
        (np.array([[-0.5, 0.5]]), "negative"),  # (zero-centred: refused, not clipped to its upper half)
        (np.array([[-0.11, 0.5]]), "negative"),
        (np.array([[0.5, 300.0]]), "up to 300"),
        (np.array([[1, 70000]], np.int64), "up to 70000"),
        (np.zeros((0, 5)), "no pixels"),
        (np.array([["a", "b"]]), "not a number type"),
        (np.zeros((2, 2), np.complex64), "not a number type"),
    ],
)
def test_bad_npy_arrays(tmp_path, array, match):
    np.save(tmp_path / "bad.npy", array)
    with pytest.raises(CapsctlError, match=r"bad\.npy: .*" + match):
        load_image(tmp_path / "bad.npy")


def test_object_npy_refused_without_unpickling(tmp_path):
    np.save(tmp_path / "obj.npy", np.array([[1, None]], dtype=object), allow_pickle=True)
    with pytest.raises(CapsctlError, match=r"obj\.npy: the array holds Python objects"):
        load_image(tmp_path / "obj.npy")


def test_truncated_npy_and_fake_npy(tmp_path):
    np.save(tmp_path / "a.npy", np.ones((30, 30), np.float32))
    data = (tmp_path / "a.npy").read_bytes()
    (tmp_path / "cut.npy").write_bytes(data[:-100])
    with pytest.raises(CapsctlError, match=r"cut\.npy: truncated \.npy file"):
        load_image(tmp_path / "cut.npy")
    (tmp_path / "head.npy").write_bytes(data[:20])
    with pytest.raises(CapsctlError, match=r"head\.npy: not a valid \.npy file"):
        load_image(tmp_path / "head.npy")
    (tmp_path / "fake.npy").write_bytes(b"just text")
    with pytest.raises(CapsctlError, match=r"fake\.npy: not a \.npy file"):
        load_image(tmp_path / "fake.npy")


def test_bad_options(tmp_path):
    Image.fromarray(digit()).save(tmp_path / "d.png")
    with pytest.raises(CapsctlError, match="--invert"):
        load_image(tmp_path / "d.png", invert="maybe")
    with pytest.raises(CapsctlError, match="--resize"):
        load_image(tmp_path / "d.png", resize=(0, 5))
    with pytest.raises(CapsctlError, match="--resize"):
        load_image(tmp_path / "d.png", resize=(20000, 20000))


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    prefix=st.sampled_from(
        [b"", b"\x89PNG\r\n\x1a\n", b"\x93NUMPY\x01\x00", b"\xff\xd8\xff", b"BM", b"GIF89a"]),
    body=st.binary(max_size=300),
    suffix=st.sampled_from([".png", ".npy", ".jpg", ".bin"]),
)
def test_random_bytes_raise_only_capsctl_errors(tmp_path, prefix, body, suffix):
    path = tmp_path / f"fuzz{suffix}"
    path.write_bytes(prefix + body)
    try:
        x = load_image(path)
    except CapsctlError as e:
        assert str(e).startswith(str(path)) and "\n" not in str(e)
    else:  # a few random byte strings are valid tiny images
        assert x.ndim == 2 and x.dtype == np.float32 and np.isfinite(x).all()
        assert x.min() >= 0.0 and x.max() <= 1.0
