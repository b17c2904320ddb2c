"""Save one test-set composite (the paired-digit protocol, capsctl.composites) as a PNG.

    python tools/composite_png.py --index 3 --out two.png
    capsctl inspect RUN/model.safetensors two.png --top 2 --out maps.png

Prints the composite's labels in placement order (top to bottom / left to right).
"""

from __future__ import annotations

import argparse
import io
import sys
from pathlib import Path

import numpy as np
from PIL import Image

from capsctl._io import atomic_write_bytes
from capsctl._script_args import add_data, test_images
from capsctl.data.composites import make_composites
from capsctl.data.images import data_background
from capsctl.errors import CapsctlError, run_script


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_data(ap)
    ap.add_argument("--index", type=int, default=0, help="which kept composite (0-based)")
    ap.add_argument(
        "--layout",
        default="vertical",
        help="how the digits are placed: vertical, horizontal or overlap (default: vertical)",
    )
    ap.add_argument("--digits", type=int, default=2, help="digits per composite (default: 2)")
    ap.add_argument("--seed", type=int, default=0, help="pairing seed (the contract's default: 0)")
    ap.add_argument("--out", required=True, help="the PNG file to write")
    args = ap.parse_args()
    out = Path(args.out)
    if args.index < 0:
        raise CapsctlError(f"--index must be 0 or more, got {args.index}")
    if out.suffix.lower() != ".png":
        raise CapsctlError(f"--out {out}: the output must end in .png")
    if not out.parent.is_dir():
        raise CapsctlError(f"--out {out}: folder {out.parent} does not exist")
    test = test_images(args)
    light = data_background(test.images) == "light"  # (as an experiment on this data makes its composites)
    comp = make_composites(
        test.images,
        test.labels,
        digits=args.digits,
        layout=args.layout,
        seed=args.seed,
        limit=args.index + 1,
        light=light,
    )
    if args.index >= len(comp.images):
        raise CapsctlError(f"--index {args.index}: the test set makes {len(comp.images)} such composites")
    pixels = comp.images[args.index]  # (H, W, C): a colour data set's composite stays in colour
    img = np.round((pixels[:, :, 0] if pixels.shape[2] == 1 else pixels) * 255).astype(np.uint8)
    png = io.BytesIO()
    Image.fromarray(img).save(png, format="PNG")
    atomic_write_bytes(out, png.getvalue())
    print("labels:", " ".join(map(str, comp.labels[args.index])))


if __name__ == "__main__":
    sys.exit(run_script(main))
