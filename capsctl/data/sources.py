"""`--dataset PATH`: the user's own data, recognised by what the path holds.

- a folder with train/ (and test/): an ImageFolder layout (capsctl.data.folders); without test/ the
  commands score on held-out training images (`held_out`: --holdout N or --val-fraction F);
- a `.npz` file with x_train, y_train, x_test, y_test (capsctl.data.npz);
- a folder of the four MNIST-style IDX files (capsctl.data.idx), as `--data-dir` takes.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from capsctl.data import datasets, idx
from capsctl.errors import CapsctlError

MAX_SIDE = 4096


def parse_image_size(text: str | None) -> tuple[int, int] | None:
    """'HxW' -> (height, width); both sides 1..MAX_SIDE."""
    if text is None:
        return None
    parts = text.lower().replace("×", "x").split("x")
    try:
        h, w = (int(p) for p in parts)
    except ValueError:
        raise CapsctlError(f"--image-size must be HxW, e.g. 28x28, got {text!r}") from None
    if not (1 <= h <= MAX_SIDE and 1 <= w <= MAX_SIDE):
        raise CapsctlError(f"--image-size {text}: each side must be 1..{MAX_SIDE}")
    return h, w


def is_path(name: str) -> bool:
    """A --dataset value that is not a registry name: a path (it need not exist, for the message)."""
    return name not in datasets.DATASETS


class _NoTest(datasets.Dataset):
    """An image folder with train/ and no test/: its test split must be held out of the training images."""

    def test(self) -> datasets.Split:
        raise CapsctlError(
            f"{self.folder}: has train/ but no test/ folder; give --holdout N or --val-fraction F to score "
            "on training images held out instead (train, eval, eval-pairs, experiment pairs)"
        )


def held_out(
    train: datasets.Split, holdout: int | None, val_fraction: float | None
) -> tuple[datasets.Split, datasets.Split]:
    """(the rest, the held-out images) for --holdout N or --val-fraction F: the fixed seeded draw of
    datasets.hold_out, so every run and recipe is scored on the same images."""
    if holdout is not None and val_fraction is not None:
        raise CapsctlError("give --holdout N or --val-fraction F, not both")
    n_train = len(train.images)
    if val_fraction is None:
        assert holdout is not None, "held_out needs --holdout or --val-fraction"
        return datasets.hold_out(train, holdout)
    check_val_fraction(val_fraction)
    n = round(val_fraction * n_train)
    if not 1 <= n < n_train:
        raise CapsctlError(
            f"--val-fraction {val_fraction} of {n_train} training images holds out {n}; "
            f"it must hold out 1..{n_train - 1}"
        )
    return datasets.hold_out(train, n)


def splits(
    ds: datasets.Dataset, holdout: int | None, val_fraction: float | None
) -> tuple[datasets.Split, datasets.Split]:
    """(train, test) of a data set: with --holdout/--val-fraction the test split is the held-out training
    images and the official test set is never read (a folder may have none; choices made on these scores
    stay honest); else the data set's own test split. Every command that scores goes through here, so
    train, eval, eval-pairs and the experiments hold out the same images."""
    if holdout is None and val_fraction is None:
        return ds.train(), ds.test()
    return held_out(ds.train(), holdout, val_fraction)


def check_val_fraction(value: float | None) -> None:
    if value is not None and not 0 < value < 1:  # (also refuses NaN)
        raise CapsctlError(f"--val-fraction must be between 0 and 1 (exclusive), got {value}")


def load_path(text: str, image_size: tuple[int, int] | None = None) -> datasets.Dataset:
    p = Path(text)
    test: tuple[np.ndarray, np.ndarray] | None
    if p.is_file():
        if p.suffix.lower() != ".npz":
            raise CapsctlError(
                f"--dataset {p}: a file must be an .npz archive (x_train, y_train, x_test, y_test)"
            )
        from capsctl.data.npz import load_npz

        train, test, classes = load_npz(p, image_size)
    elif p.is_dir():
        from capsctl.data import folders

        if folders.is_image_folder(p):
            train, test, classes = folders.load_image_folder(p, image_size)
        elif datasets.is_complete(p):
            train, test, classes = _idx_folder(p, image_size)
        else:
            raise CapsctlError(
                f"--dataset {p}: not a data set (expected {p}/train/<class>/ image folders, "
                "the four MNIST IDX files, or an .npz file)"
            )
    else:
        known = ", ".join(datasets.DATASETS)
        raise CapsctlError(f"--dataset {text}: neither a known data set ({known}) nor an existing path")
    ds = datasets.Dataset(str(p), p, class_names=classes) if test else _NoTest(str(p), p, class_names=classes)
    ds._cache["train"] = datasets.Split(*train)
    if test:
        ds._cache["t10k"] = datasets.Split(*test)
    return ds


def _idx_folder(
    p: Path, image_size: tuple[int, int] | None
) -> tuple[tuple[np.ndarray, np.ndarray], tuple[np.ndarray, np.ndarray], tuple[str, ...]]:
    out = []
    for prefix in ("train", "t10k"):
        img_path = datasets.find_file(p, f"{prefix}-images")
        lab_path = datasets.find_file(p, f"{prefix}-labels")
        assert img_path and lab_path
        images = idx.load_images(img_path)
        labels = idx.load_labels(lab_path, 256)
        if len(images) != len(labels):
            raise CapsctlError(
                f"{img_path}: {len(images)} images but {lab_path.name} has {len(labels)} labels"
            )
        if image_size is not None and images.shape[1:3] != image_size:
            from capsctl.data.npz import _resize

            u8 = np.clip(images * 255 + 0.5, 0, 255).astype(np.uint8)
            images = _resize(u8, image_size).astype(np.float32) / 255.0
        out.append((images, labels))
    top = int(max(out[0][1].max(initial=0), out[1][1].max(initial=0)))
    classes = tuple(str(j) for j in range(top + 1))
    from capsctl.data.npz import require_training_images

    # (labels counted from 1, as EMNIST letters' are, made a class 0 that nothing trains)
    where = str(datasets.find_file(p, "train-labels"))
    require_training_images(where, out[0][1], classes, f"labels 0..{top}")
    return out[0], out[1], classes
