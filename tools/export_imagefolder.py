"""Export an MNIST-style IDX data set to an ImageFolder tree of grey 8-bit PNGs.

    python tools/export_imagefolder.py fashion-mnist OUT
    python tools/export_imagefolder.py mnist-5k OUT
    capsctl train --dataset OUT ...        # the same images as --dataset fashion-mnist

SOURCE is a registry name (mnist-5k, mnist, fashion-mnist; found as capsctl finds them, --data-dir
included) or a folder holding the four IDX files. Writes OUT/train/<class>/<index>.png and
OUT/test/<class>/<index>.png, index = the image's position in its IDX file, zero-padded (5 digits, more
for larger sets) so file names sort in IDX order. Pixels are written as they are: reading a PNG back
gives the IDX file's uint8 values exactly.

Class folders are the registry's class names (digits for a folder of IDX files). capsctl numbers the
classes of an image folder by their sorted folder names, so where the names do not sort in label
order (fashion-mnist: T-shirt, Trouser, ... would become Bag, Boot, ...) each folder is prefixed with
its label ("0-T-shirt", ..., "9-Boot"): the labels, and so a training run, are then the same as on the
IDX files. --plain-names drops the prefix (the labels are then renumbered alphabetically).

The tree is written to a temporary sibling of OUT and renamed into place at the end, so an
interrupted export never leaves a half data set behind. OUT must not exist, or be an empty folder.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image

from capsctl.data import datasets, idx
from capsctl.errors import CapsctlError

SPLITS = (("train", "train"), ("test", "t10k"))  # (ImageFolder split, IDX prefix)


def read_idx_set(
    source: str, data_dir: str | None = None
) -> tuple[dict[str, tuple[np.ndarray, np.ndarray]], tuple[str, ...]]:
    """{split: (uint8 images (N, H, W), int64 labels (N,))} and the class names, from a registry name
    or a folder of the four IDX files."""
    if source in datasets.DATASETS:
        info = datasets.get_info(source)
        if info.archive:
            raise CapsctlError(f"{source}: not an IDX data set (it is the archive {info.archive})")
        folder = datasets.locate(source, data_dir)
        classes: tuple[str, ...] | None = info.classes
    else:
        if data_dir is not None:
            raise CapsctlError(f"--data-dir is for the named data sets; {source} is a path already")
        folder = Path(source)
        if not folder.is_dir():
            known = ", ".join(n for n, i in datasets.DATASETS.items() if not i.archive)
            raise CapsctlError(f"{source}: neither a known IDX data set ({known}) nor a folder")
        if not datasets.is_complete(folder):
            missing = next(datasets.FILES[r] for r in datasets.ROLES if not datasets.find_file(folder, r))
            raise CapsctlError(f"{folder}: missing {missing}(.gz); the folder must hold the four IDX files")
        classes = None
    limit = len(classes) if classes is not None else 256
    out = {}
    for split, prefix in SPLITS:
        img_path = datasets.find_file(folder, f"{prefix}-images")
        lab_path = datasets.find_file(folder, f"{prefix}-labels")
        assert img_path is not None and lab_path is not None
        images = idx.read_idx(img_path)
        # the raw bytes, not idx.load_images' floats: the PNGs must hold exactly the file's values
        if images.ndim != 3 or images.dtype != np.uint8 or 0 in images.shape:
            raise CapsctlError(
                f"{img_path}: expected unsigned-byte images (N, H, W), "
                f"found {images.dtype} {list(images.shape)}"
            )
        labels = idx.load_labels(lab_path, limit)
        if len(images) != len(labels):
            raise CapsctlError(
                f"{img_path}: {len(images)} images but {lab_path.name} has {len(labels)} labels"
            )
        out[split] = (images, labels)
    if classes is None:
        top = max(int(lab.max(initial=0)) for _, lab in out.values())
        width = len(str(top))  # "07" beside "12": digit names that sort in label order
        classes = tuple(f"{j:0{width}d}" for j in range(top + 1))
    return out, classes


def folder_names(classes: Sequence[str], plain: bool = False) -> list[str]:
    """One folder name per label, sorting in label order unless `plain` (see the module's help)."""
    names = list(classes)
    if plain or names == sorted(names):
        return names
    width = len(str(len(names) - 1))
    return [f"{j:0{width}d}-{name}" for j, name in enumerate(names)]


def export(
    sets: dict[str, tuple[np.ndarray, np.ndarray]], folders: Sequence[str], out: Path, quiet: bool = False
) -> int:
    """Write the PNG tree to `out` (see the module's help); returns the number of images written."""
    from capsctl._console import progress

    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise CapsctlError(f"{out}: already exists and is not an empty folder; choose a new OUT")
    parent = out.parent if str(out.parent) else Path(".")
    if not parent.is_dir():
        raise CapsctlError(f"{out}: folder {parent} does not exist")
    tmp = parent / f".{out.name}.partial-{os.getpid()}"
    total = sum(len(labels) for _, labels in sets.values())
    try:
        with progress() as bar:
            task = bar.add_task("PNG files", total=total, visible=not quiet)
            for split, (images, labels) in sets.items():
                width = max(5, len(str(len(images) - 1)))
                for name in {folders[j] for j in np.unique(labels)}:
                    (tmp / split / name).mkdir(parents=True)
                for i, (img, label) in enumerate(zip(images, labels, strict=True)):
                    # mode L from a 2-D uint8 array: grey 8-bit, stored losslessly
                    Image.fromarray(img).save(tmp / split / folders[label] / f"{i:0{width}d}.png")
                    bar.advance(task)
        os.replace(tmp, out)  # rename(2) also replaces an empty folder
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return total


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        epilog=__doc__.split("\n\n", 1)[1],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    ap.add_argument(
        "source",
        metavar="SOURCE",
        help="a registry name (mnist-5k, mnist, fashion-mnist) or a folder with the four IDX files",
    )
    ap.add_argument("out", metavar="OUT", type=Path, help="the ImageFolder tree to write (must not exist)")
    ap.add_argument(
        "--data-dir", default=None, help="where the named data set's IDX files are (as capsctl's)"
    )
    ap.add_argument(
        "--plain-names",
        action="store_true",
        help="class folders named exactly as the classes, even where that renumbers the labels",
    )
    ap.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    args = ap.parse_args(argv)
    try:
        sets, classes = read_idx_set(args.source, args.data_dir)
        folders = folder_names(classes, args.plain_names)
        n = export(sets, folders, args.out, args.quiet)
    except CapsctlError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except OSError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    sizes = ", ".join(f"{len(labels)} {split}" for split, (_, labels) in sets.items())
    print(f"{args.out}: {n} PNG files ({sizes}), classes {', '.join(folders)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
