"""Save one test-set composite (the paired-digit protocol, capsctl.composites) as a PNG.

    python tools/composite_png.py --index 3 --out two.png
    capsctl inspect two.png --model RUN/model.safetensors --top 2 --out maps.png

Prints the composite's labels in placement order (top to bottom / left to right).
"""

from __future__ import annotations

import argparse

import numpy as np
from PIL import Image

from capsctl.data import datasets
from capsctl.data.composites import make_composites


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data-dir", default=None)
    ap.add_argument("--dataset", default="mnist-5k")
    ap.add_argument("--index", type=int, default=0, help="which kept composite (0-based)")
    ap.add_argument("--layout", default="vertical")
    ap.add_argument("--digits", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    test = datasets.load(args.dataset, args.data_dir).test()
    comp = make_composites(
        test.images, test.labels, digits=args.digits, layout=args.layout, seed=args.seed, limit=args.index + 1
    )
    img = np.round(comp.images[args.index, :, :, 0] * 255).astype(np.uint8)
    Image.fromarray(img).save(args.out)
    print("labels:", " ".join(map(str, comp.labels[args.index])))


if __name__ == "__main__":
    main()
