"""Make a colour digit set: each grey digit drawn in its own random foreground and background colour.

    python tools/make_colour_digits.py /tmp/colour-digits.npz
    capsctl train --dataset /tmp/colour-digits.npz ...

Reads a grey data set (default mnist-5k, the copy inside capsctl; any registry name or path that
`capsctl train --dataset` takes) and writes an .npz in the keras.datasets convention: x_train,
y_train, x_test, y_test (uint8, NHWC with C = 3) and class_names. Each image gets a foreground and a
background colour drawn uniformly from the RGB cube, redrawn until the two are at least
--min-distance apart (Euclidean, 0..255 per channel), so no digit vanishes into its background; each
pixel is the background blended towards the foreground by the digit's grey value. Same --seed, same
file. The labels and the order of the images are the source's.

--background black keeps every background black and draws only the ink colour (at least
--min-distance from black): a stacked pair then has one background, as the grey composites do, where
random backgrounds give each half its own (an edge across the middle no single training image has).

The file is generated (about 5 MB for mnist-5k): keep it out of the repository.
"""

from __future__ import annotations

import argparse
import io
import sys
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from capsctl._io import atomic_write_bytes
from capsctl.data import datasets
from capsctl.errors import CapsctlError

MAX_MIN_DISTANCE = 300.0  # the cube's diagonal is 441.7; beyond ~300 few pairs qualify and drawing crawls


def draw_colours(
    rng: np.random.Generator, n: int, min_distance: float, black: bool = False
) -> tuple[np.ndarray, np.ndarray]:
    """(foreground, background): uint8 (n, 3) each, every pair at least `min_distance` apart; with
    `black`, every background is black and only the foreground is drawn."""
    fg = rng.integers(0, 256, (n, 3), dtype=np.uint8)
    bg = np.zeros((n, 3), np.uint8) if black else rng.integers(0, 256, (n, 3), dtype=np.uint8)
    while True:
        close = np.linalg.norm(fg.astype(np.float64) - bg, axis=1) < min_distance
        k = int(close.sum())
        if not k:
            return fg, bg
        # redraw both colours of the pairs too close; each pass keeps about half the rest at 150
        fg[close] = rng.integers(0, 256, (k, 3), dtype=np.uint8)
        if not black:
            bg[close] = rng.integers(0, 256, (k, 3), dtype=np.uint8)


def colourise(grey: np.ndarray, fg: np.ndarray, bg: np.ndarray) -> np.ndarray:
    """uint8 (N, H, W, 3): grey (N, H, W) uint8 as the weight of fg (N, 3) over bg (N, 3)."""
    a = grey.astype(np.float32)[..., None] / 255.0
    out = bg[:, None, None, :].astype(np.float32) * (1 - a) + fg[:, None, None, :].astype(np.float32) * a
    return np.clip(np.rint(out), 0, 255).astype(np.uint8)


def make(
    source: str, data_dir: str | None, seed: int, min_distance: float, background: str = "random"
) -> dict[str, np.ndarray]:
    """The arrays of the colour set, from the grey set `source`."""
    if not 0 <= min_distance <= MAX_MIN_DISTANCE:
        raise CapsctlError(f"--min-distance must be in 0..{MAX_MIN_DISTANCE:g}, got {min_distance:g}")
    ds = datasets.load(source, data_dir)
    rng = np.random.default_rng(seed)
    arrays: dict[str, np.ndarray] = {}
    for key, split in (("train", ds.train()), ("test", ds.test())):
        if split.images.shape[3] != 1:
            raise CapsctlError(
                f"{source}: the images have {split.images.shape[3]} channels; expected grey (1)"
            )
        # the loaders give u8 / 255 as float32; rint(x * 255) gives the bytes back exactly
        grey = np.rint(split.images[..., 0] * 255).astype(np.uint8)
        fg, bg = draw_colours(rng, len(grey), min_distance, black=background == "black")
        arrays[f"x_{key}"] = colourise(grey, fg, bg)
        arrays[f"y_{key}"] = split.labels.astype(np.uint8 if split.labels.max(initial=0) < 256 else np.int64)
    arrays["class_names"] = np.array(ds.classes, dtype=np.str_)  # a string array: loads without pickle
    return arrays


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        epilog=__doc__.split("\n\n", 1)[1],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    ap.add_argument("out", metavar="OUT.npz", type=Path, help="the .npz file to write")
    ap.add_argument("--dataset", default="mnist-5k", help="the grey source: a registry name or a path")
    ap.add_argument("--data-dir", default=None, help="where a named data set's files are (as capsctl's)")
    ap.add_argument("--seed", type=int, default=0, help="seed of the colour draws (numpy default_rng)")
    ap.add_argument(
        "--min-distance",
        type=float,
        default=150.0,
        help="least RGB distance between an image's foreground and background colours",
    )
    ap.add_argument(
        "--background",
        choices=("random", "black"),
        default="random",
        help="random: a background colour per image; black: black backgrounds, random ink colours",
    )
    args = ap.parse_args(argv)
    try:
        if args.out.suffix.lower() != ".npz":
            raise CapsctlError(f"{args.out}: the output must end in .npz (capsctl reads .npz files)")
        parent = args.out.parent if str(args.out.parent) else Path(".")
        if not parent.is_dir():
            raise CapsctlError(f"{args.out}: folder {parent} does not exist")
        if args.seed < 0:
            raise CapsctlError(f"--seed must be 0 or more, got {args.seed}")
        arrays = make(args.dataset, args.data_dir, args.seed, args.min_distance, args.background)
        buf = io.BytesIO()
        np.savez_compressed(buf, **arrays)  # type: ignore[arg-type]
        atomic_write_bytes(args.out, buf.getvalue())
    except (CapsctlError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    n_train, n_test = len(arrays["y_train"]), len(arrays["y_test"])
    h, w = arrays["x_train"].shape[1:3]
    print(f"{args.out}: {n_train} train + {n_test} test colour images ({h}x{w}x3), seed {args.seed}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
