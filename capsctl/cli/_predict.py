"""`capsctl predict`: class scores for the user's own images (files, folders, or a list on stdin)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

from capsctl._console import shown
from capsctl.cli._options import BackendOpt, BatchSizeOpt, FitOpt, Invert, QuietOpt, shipped_model_said

if TYPE_CHECKING:
    from collections.abc import Iterator

    import numpy as np

    from capsctl.model.spec import ModelSpec

# what a folder is searched for (files named on the command line or stdin are read whatever their name)
IMAGE_SUFFIXES = frozenset(
    {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm", ".pbm", ".npy"}
)


# a first argument with one of these suffixes is an exported model, not an image
_EXPORT_SUFFIXES = frozenset({".onnx", ".pt", ".pth", ".keras", ".h5"})


def predict(
    model: Annotated[
        str,
        typer.Argument(
            metavar="MODEL",
            help="A capsctl model file (.safetensors); when the first argument is not one, it is the first "
            "INPUT and the model that ships with capsctl is used.",
            show_default=False,
        ),
    ],
    inputs: Annotated[
        list[str] | None,
        typer.Argument(
            metavar="INPUT...",
            help="Image files, folders (searched recursively for images), or - to read paths from stdin "
            "(one a line).",
            show_default=False,
        ),
    ] = None,
    backend: BackendOpt = "torch",
    top: Annotated[
        int | None,
        typer.Option(help="List the K highest-scoring classes of each image.",
                     show_default="3, or the model's class count when it has fewer"),
    ] = None,
    threshold: Annotated[
        float,
        typer.Option(help="Classes scoring above this are 'present' (the objects in a multi-object image)."),
    ] = 0.5,
    json_out: Annotated[
        bool, typer.Option("--json", help="One JSON object per image, one a line, as results come.")
    ] = False,
    csv_out: Annotated[bool, typer.Option("--csv", help="CSV with a header row, as results come.")] = False,
    invert: Annotated[
        Invert,
        typer.Option(help="auto (bring a gray image to the background the model trained on: white ink on "
                     "black for MNIST; colour: never), yes, no."),
    ] = "auto",
    resize: Annotated[
        str | None, typer.Option(help="Resize every image to HxW pixels first, e.g. 28x28.",
                                 show_default="keep each image's size")
    ] = None,
    fit: FitOpt = False,
    batch_size: BatchSizeOpt = 512,
    quiet: QuietOpt = False,
) -> None:
    """Predict the classes of your own images: the top K classes with their scores and, for a
    multi-object image, the set of classes scoring over --threshold.

    Images are read like `capsctl inspect` reads them (PNG, JPEG, BMP, GIF, TIFF, WebP, PPM or
    .npy; any size; a gray image is brought to the background the model trained on with --invert
    auto) and run in batches of
    images of the same size. A folder is searched recursively; files in it that are not images by
    their name are skipped and counted. A file that cannot be read is reported in the output with
    its reason (an "error" column or key), every other file is still predicted, and the exit code
    is 2 at the end.

    Example: capsctl predict runs/capsule/model.safetensors docs/ --top 2 --json   (every image under docs/)

    Example: capsctl predict docs/digit-4.png   (the shipped model)
    """
    import sys

    from capsctl._console import err
    from capsctl.cli._options import check_range
    from capsctl.data.images import parse_size
    from capsctl.errors import CapsctlError
    from capsctl.model.weights import load_model

    if json_out and csv_out:
        raise CapsctlError("--json and --csv: give one of them")
    check_range("--threshold", threshold, 0.0, 1.0)
    check_range("--batch-size", batch_size, 1, 65536)
    size = parse_size(resize) if resize is not None else None
    if fit and size is None:
        raise CapsctlError("--fit scales to fit the --resize size: give --resize HxW too")
    inputs = list(inputs or [])
    suffix = Path(model).suffix.lower()
    if suffix in _EXPORT_SUFFIXES:  # (it was taken as an image, and the shipped model scored the rest)
        raise CapsctlError(
            f"{model}: an export; predict takes a capsctl model (.safetensors): the one it was exported "
            "from, or `capsctl import` it back into one"
        )
    if suffix == ".safetensors":
        model_path = Path(model)
        if not inputs:
            raise typer.BadParameter("give the images after the model: capsctl predict MODEL INPUT...",
                                     param_hint="'INPUT...'")
    else:  # no model given: every argument is an input
        inputs.insert(0, model)
        model_path = shipped_model_said()
    paths, skipped = collect_paths(inputs, sys.stdin)
    spec, weights = load_model(model_path)
    if top is None:  # (a 2-class model is asked for its 2 classes, not refused for 3)
        top = min(3, spec.num_classes)
    check_range("--top", top, 1, spec.num_classes)
    if spec.in_channels not in (1, 3):
        raise CapsctlError(
            f"{model_path}: the model takes {spec.in_channels}-channel images; predict reads gray (1) or "
            "RGB (3)"
        )
    from capsctl.backend import get_backend

    runner = get_backend(backend).runner(spec, weights)
    names = class_names(spec)
    fmt = "json" if json_out else "csv" if csv_out else "table"
    writer = _Writer(fmt, top, names)
    failed = 0
    show_bar = not quiet and len(paths) > batch_size
    with _maybe_progress(show_bar, len(paths)) as advance:
        for result in run_predictions(
            paths, runner.scores, spec, invert=str(invert), resize=size, fit=fit, batch_size=batch_size
        ):
            failed += "error" in result
            writer.write(result, top, threshold)
            advance(1)
    writer.close(f"{shown(str(model_path))} ({backend})")
    done = len(paths) - failed
    note = f"; {skipped} non-image file(s) in the folders skipped" if skipped else ""
    summary = f"{done} image(s) predicted, {failed} could not be read or did not fit the model{note}"
    err.print(summary, highlight=False, soft_wrap=True)
    if failed:
        raise typer.Exit(2)


# -- the inputs -----------------------------------------------------------------------------------------


def collect_paths(inputs: list[str], stdin: Any) -> tuple[list[Path], int]:
    """The files to predict, in order, and how many non-image files the folders held.

    `-` reads paths from `stdin`, one a line (blank lines ignored); a folder is searched recursively
    (sorted) for files with an image suffix. A folder with no image at all stays in the list, to be
    reported in the output as a file that cannot be read is; when no input holds an image, it is an
    error."""
    from capsctl.errors import CapsctlError

    paths: list[Path] = []
    skipped = 0
    empty: list[str] = []  # the folders without an image, as their error lines
    given: list[str] = []
    for item in inputs:
        if item == "-":
            # paths are bytes to the OS: read them as bytes, so a name that is not UTF-8 is still a name
            raw = getattr(stdin, "buffer", stdin)
            lines = (os.fsdecode(x) if isinstance(x, bytes) else x for x in raw)
            # (only the line end is cut: a name may begin or end with a space)
            given.extend(name for name in (line.rstrip("\r\n") for line in lines) if name.strip())
        else:
            given.append(item)
    if not given:
        raise CapsctlError("no input: give image files, folders, or - with paths on stdin")
    for item in given:
        p = Path(item)
        if not p.is_dir():
            paths.append(p)  # a missing or unreadable file is reported in the output, with its reason
            continue
        if _unreadable(p) is not None:
            paths.append(p)  # (its row says why)
            continue
        images, others = [], 0
        for f in sorted(p.rglob("*")):
            if f.is_dir():
                if _unreadable(f) is not None:  # (rglob passed over it without a word: its images vanished)
                    images.append(f)
                continue
            # (a named pipe among them: read, it hung; a dangling link stays, as a row saying so)
            if f.suffix.lower() in IMAGE_SUFFIXES and (f.is_file() or not f.exists()):
                images.append(f)
            else:
                others += 1
        skipped += others
        if not images:
            empty.append(_no_images(p, others))
            paths.append(p)  # (its row says so; the other inputs are still predicted)
        paths.extend(images)
    if len(empty) == len(paths):
        raise CapsctlError(empty[0])
    return paths, skipped


def _unreadable(folder: Path) -> str | None:
    """Why a folder cannot be listed, or None."""
    try:
        with os.scandir(folder) as entries:
            next(entries, None)
    except OSError as e:
        return f"{folder}: cannot read this folder ({e.strerror or e})"
    return None


def _no_images(folder: Path, others: int | None = None) -> str:
    more = f" ({others} other file(s))" if others else ""
    return f"{folder}: no images in this folder{more}; expected {', '.join(sorted(IMAGE_SUFFIXES))} files"


# -- reading and scoring ----------------------------------------------------------------------------------


def class_names(spec: ModelSpec) -> list[str]:
    """The model's class names (its spec's `class_names` where it has them), else the indices."""
    from capsctl.model.spec import names_of

    return list(names_of(spec))


def _read(
    path: Path, spec: ModelSpec, invert: str, resize: tuple[int, int] | None, fit: bool = False
) -> np.ndarray:
    """One image as float32 (H, W, C) for `spec`, or a CapsctlError naming the file."""
    from capsctl.data.images import load_image

    if path.is_dir():  # (a folder given without an image in it, or unreadable: kept for its row)
        from capsctl.errors import CapsctlError

        raise CapsctlError(_unreadable(path) or _no_images(path))

    # a colour model gets RGB (a gray file in all three channels); a gray model gets luma
    img = load_image(path, invert=invert, resize=resize, spec=spec, channels=spec.in_channels, fit=fit)
    if img.ndim == 2:
        img = img[:, :, None]
    from capsctl.model.fit import check_takes

    check_takes(spec, img.shape[0], img.shape[1], str(path), "the model")
    return img


# Memory bounds for big images (phone photos are 12 million pixels; 512 of them read at once were 24 GB
# of float32, and one forward call over all of them far more): a chunk stops reading once it holds
# READ_PIXELS decoded values (pixels × channels), and a forward call takes at most FORWARD_PIXELS pixels
# of images (at least one image). MNIST-sized images still go `--batch-size` at a time.
READ_PIXELS = 1 << 27  # decoded values (H·W·C): 512 MiB of float32
FORWARD_PIXELS = 1 << 22  # 5,350 images of 28x28; one of 2048x2048


def run_predictions(
    paths: list[Path],
    scores_fn: Any,
    spec: ModelSpec,
    *,
    invert: str = "auto",
    resize: tuple[int, int] | None = None,
    fit: bool = False,
    batch_size: int = 512,
) -> Iterator[dict[str, Any]]:
    """Yield {"image", "scores"} or {"image", "error"} per path, in the order of `paths`.

    Files are read up to `batch_size` (and READ_PIXELS) at a time, the next chunk in a background thread
    while the framework scores this one; the images of one chunk are grouped by size and each group is
    scored by `scores_fn(images (N, H, W, C), per_call) -> (N, J)`, per_call images (FORWARD_PIXELS) a
    forward pass."""
    import threading
    from collections import deque
    from concurrent.futures import ThreadPoolExecutor

    import numpy as np

    remaining = deque(paths)  # taken from by the reader thread only, one chunk at a time
    stop = threading.Event()  # (Ctrl-C, SIGTERM, a closed pipe: the reader stops at its next file)

    def read_next() -> tuple[list[dict[str, Any]], dict[tuple[int, ...], list[tuple[int, np.ndarray]]]]:
        return _read_chunk(remaining, batch_size, spec, invert, resize, fit, stop)

    with ThreadPoolExecutor(max_workers=1) as pool:
        try:
            pending = pool.submit(read_next) if remaining else None
            while pending is not None:
                results, groups = pending.result()
                pending = pool.submit(read_next) if remaining else None
                for shape, members in groups.items():
                    batch = np.stack([img for _, img in members])
                    per_call = max(1, min(batch_size, FORWARD_PIXELS // (shape[0] * shape[1])))
                    out = np.asarray(scores_fn(batch, per_call))
                    for (i, _), row in zip(members, out, strict=True):
                        results[i]["scores"] = row
                yield from results
        finally:
            stop.set()


def _read_chunk(
    remaining: Any,
    most: int,
    spec: ModelSpec,
    invert: str,
    resize: tuple[int, int] | None,
    fit: bool = False,
    stop: Any = None,
) -> tuple[list[dict[str, Any]], dict[tuple[int, ...], list[tuple[int, np.ndarray]]]]:
    """The next chunk taken from `remaining` (a deque of paths): up to `most` files, fewer once READ_PIXELS
    values are decoded or `stop` (a threading.Event) is set. Its result slots (errors filled in) and its
    images by shape: {shape: [(slot, image)]}."""
    from capsctl.errors import CapsctlError

    results: list[dict[str, Any]] = []
    groups: dict[tuple[int, ...], list[tuple[int, np.ndarray]]] = {}
    pixels = 0
    while remaining and len(results) < most and pixels < READ_PIXELS and not (stop and stop.is_set()):
        p = remaining.popleft()
        results.append({"image": str(p)})
        try:
            img = _read(p, spec, invert, resize, fit)
        except CapsctlError as e:
            results[-1]["error"] = _reason(str(e), p)
            continue
        pixels += img.size
        groups.setdefault(img.shape, []).append((len(results) - 1, img))
    return results, groups


def _reason(message: str, p: Path) -> str:
    prefix = f"{p}: "
    return message[len(prefix):] if message.startswith(prefix) else message


# -- the output --------------------------------------------------------------------------------------------


class _Writer:
    """Writes results as a table (at the end), JSON lines or CSV rows (as they come)."""

    def __init__(self, fmt: str, top: int, names: list[str]) -> None:
        self.fmt, self.names = fmt, names
        self.rows: list[list[str]] = []
        self.csv: Any = None
        if fmt == "csv":
            import csv
            import sys

            self.csv = csv.writer(sys.stdout, lineterminator="\n")
            head = ["image"]
            for k in range(1, top + 1):
                head += [f"top{k}", f"score{k}"]
            self.csv.writerow([*head, "present", "error"])

    def write(self, result: dict[str, Any], top: int, threshold: float) -> None:
        import json

        image = result["image"]
        if "error" in result:
            if self.fmt == "json":
                typer.echo(json.dumps({"image": image, "error": result["error"]}))
            elif self.fmt == "csv":
                self.csv.writerow([shown(image), *([""] * (2 * top)), "", result["error"]])
            else:
                self.rows.append([_escape(shown(image)), "", "", f"[red]{_escape(result['error'])}[/]"])
            return
        scores = result["scores"]
        order = sorted(range(len(scores)), key=lambda j: -float(scores[j]))
        best = order[:top]
        present = [j for j in order if float(scores[j]) > threshold]
        if self.fmt == "json":
            typer.echo(json.dumps({
                "image": image,
                "top": [{"class": self.names[j], "index": j, "score": round(float(scores[j]), 6)}
                        for j in best],
                "present": [self.names[j] for j in present],
            }))
        elif self.fmt == "csv":
            cells = [shown(image)]
            for j in best:
                cells += [self.names[j], f"{float(scores[j]):.6f}"]
            self.csv.writerow([*cells, ";".join(self.names[j] for j in present), ""])
        else:
            topk = ", ".join(f"{_escape(self.names[j])} {float(scores[j]):.3f}" for j in best)
            found = ", ".join(_escape(self.names[j]) for j in present) or "—"
            self.rows.append([_escape(shown(image)), topk, found, ""])

    def close(self, title: str) -> None:
        import sys

        if self.fmt != "table":
            sys.stdout.flush()
            return
        from rich.table import Table

        from capsctl._console import out

        table = Table(title=_escape(title))
        table.add_column("image", overflow="fold")
        table.add_column("top (class score)")
        table.add_column("present")
        if any(r[3] for r in self.rows):
            table.add_column("error", overflow="fold")
        else:
            self.rows = [r[:3] for r in self.rows]
        for r in self.rows:
            table.add_row(*r)
        out.print(table)


def _escape(text: str) -> str:
    from rich.markup import escape

    return escape(text)


class _maybe_progress:
    """A Rich progress bar on stderr when `show`, else nothing; yields advance(n)."""

    def __init__(self, show: bool, total: int) -> None:
        self.show, self.total = show, total
        self.bar: Any = None

    def __enter__(self) -> Any:
        if not self.show:
            return lambda n: None
        from capsctl._console import progress

        self.bar = progress()
        self.bar.__enter__()
        task = self.bar.add_task("predict", total=self.total)
        return lambda n: self.bar.advance(task, n)

    def __exit__(self, *exc: object) -> None:
        if self.bar is not None:
            self.bar.__exit__(*exc)
