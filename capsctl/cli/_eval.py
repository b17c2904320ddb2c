"""`capsctl eval` and `capsctl eval-pairs`."""

from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from capsctl.cli._options import (
    BackendOpt,
    BatchSizeOpt,
    DataDirOpt,
    DatasetOpt,
    EvalLimitOpt,
    ImageSizeOpt,
    JsonOpt,
    Layout,
    ModelArg,
    OptionalModelArg,
    eval_limit_option,
    holdout_option,
    old_name,
    shipped_model_said,
    val_fraction_option,
)

if TYPE_CHECKING:
    from collections.abc import Sequence

    import numpy as np

    from capsctl.data.composites import Composites
    from capsctl.data.datasets import Split
    from capsctl.model.spec import ModelSpec

OldLimitOpt = Annotated[int | None, old_name("--limit")]  # before --eval-limit
# the held-out split `capsctl train --holdout/--val-fraction` trained beside (the same fixed draw)
HoldoutOpt = Annotated[int | None, holdout_option(scoring=True)]
ValFractionOpt = Annotated[float | None, val_fraction_option()]


def _test_split(
    dataset: str,
    data_dir: Path | None,
    image_size: str | None,
    holdout: int | None,
    val_fraction: float | None,
    spec: "ModelSpec",
    model: Path,
) -> "Split":
    """The test split, or with --holdout/--val-fraction the training images `capsctl train` held out, with
    its labels as the model's class indices."""
    from capsctl.data import datasets
    from capsctl.data.sources import parse_image_size, splits

    ds = datasets.load(dataset, data_dir, parse_image_size(image_size))
    if holdout is None and val_fraction is None:
        split = ds.test()  # (the training images are not read)
    else:
        kept, split = splits(ds, holdout, val_fraction)
        _check_same_training_part(model, kept.labels, ds.train().labels, dataset)
    return _as_model_classes(split, tuple(ds.classes), spec, model, dataset)


def _check_same_training_part(
    model: Path, labels: "np.ndarray", all_labels: "np.ndarray", dataset: str
) -> None:
    """The held-out draw follows the data's order: a folder that gained or lost a file since training
    holds out other images, many of them ones the model trained on. The model file records the training
    part its run drew from; a model trained on all of them (no hold-out) has no held-out images at all.
    A file that records neither (written before; the shipped model records its run's settings) gets a
    note: the score may not be held out."""
    import json

    from capsctl._console import err
    from capsctl.data.datasets import data_key
    from capsctl.errors import CapsctlError
    from capsctl.model.weights import TRAINING_DATA_KEY, read_safetensors

    meta = read_safetensors(model)[1]
    recorded = meta.get(TRAINING_DATA_KEY)
    everything = (  # (a run's record is of the part it drew from, before any --limit took its first N)
        f"{model}: trained on all {len(all_labels):,} {dataset} training images (no hold-out; or on the "
        "first of them, with --limit), so held-out images are ones it trained on; score it on the test set "
        "(leave out --holdout/--val-fraction)"
    )
    if recorded is None:
        if _trained_on_all(meta, dataset):
            raise CapsctlError(everything)
        err.print(
            f"note: {model} does not record the images it trained on: if they were not {dataset}'s training "
            "images beside this hold-out, these images are not held out",
            highlight=False, soft_wrap=True, markup=False,
        )
        return
    then, now = json.loads(recorded), list(data_key(labels))
    if then == list(data_key(all_labels)):
        raise CapsctlError(everything)
    if then != now:
        raise CapsctlError(
            f"{model}: trained beside a hold-out that left {then[0]:,} training images, but {dataset} now "
            f"leaves {now[0]:,} (or other labels): the data changed since, so the held-out images would not "
            "be the ones the model never saw; score it on the data as it was trained"
        )


def _split_fields(holdout: int | None, val_fraction: float | None) -> dict[str, object]:
    """What the scores in --json were taken on: the test set, or the training images held out."""
    if holdout is None and val_fraction is None:
        return {"split": "test"}
    given = {"holdout": holdout} if holdout is not None else {"val_fraction": val_fraction}
    return {"split": "held-out", **given}


def _trained_on_all(meta: dict[str, str], dataset: str) -> bool:
    """A model's provenance (the shipped model's) says its run trained on every training image of
    `dataset`: no --holdout, --val-fraction or --limit."""
    import json

    from capsctl.model.shipped import PROVENANCE_KEY

    try:
        config = json.loads(meta.get(PROVENANCE_KEY, "{}")).get("config", {})
        return bool(
            config.get("dataset") == dataset
            and all(config.get(k) is None for k in ("holdout", "val_fraction", "limit"))
        )
    except (ValueError, AttributeError):
        return False


def _as_model_classes(
    split: "Split", classes: tuple[str, ...], spec: "ModelSpec", model: Path, dataset: str
) -> "Split":
    """`split` with each label the index of its class's name among the model's classes. A data set's labels
    count its own classes (a folder's sorted class folders): a folder without class 0, or with the
    classes in another order, would otherwise be scored against the wrong classes. Where either side has
    no names of its own (an IDX folder or an .npz without class_names, a model trained on one: "0".."k-1"),
    labels are the model's indices as they are; only two different sets of real names are refused."""
    import numpy as np

    from capsctl.data.datasets import Split
    from capsctl.errors import CapsctlError
    from capsctl.model.spec import names_of, numbered

    names = names_of(spec)
    if classes == names[: len(classes)]:
        return split  # (the labels already are the model's indices)
    unknown = [c for c in classes if c not in names]
    unnamed = classes == numbered(len(classes))
    if unknown and (unnamed or spec.class_names is None):  # scored by index: one side names no classes
        if unnamed and names == numbered(len(names)):
            return split  # (neither has names: nothing to say)
        from capsctl._console import err

        pairs = ", ".join(f"{c} = {names[j]}" for j, c in enumerate(classes[:6]) if j < len(names))
        more = ", …" if len(classes) > 6 else ""
        err.print(
            f"note: {dataset}'s classes and {model}'s are matched by position, as one side has no class "
            f"names ({dataset} → model: {pairs}{more})",
            highlight=False, soft_wrap=True, markup=False,
        )
        return split
    if unknown:
        shown = ", ".join(names[:12]) + (", …" if len(names) > 12 else "")
        raise CapsctlError(
            f"{model}: {dataset} has class {unknown[0]!r}, which is not one of the model's classes "
            f"({shown}); score it on data of the classes it was trained on"
        )
    index = np.array([names.index(c) for c in classes], dtype=np.int64)
    return Split(split.images, index[split.labels])


def eval_model(
    model: ModelArg,
    backend: BackendOpt = "torch",
    dataset: DatasetOpt = "mnist-5k",
    data_dir: DataDirOpt = None,
    image_size: ImageSizeOpt = None,
    holdout: HoldoutOpt = None,
    val_fraction: ValFractionOpt = None,
    eval_limit: EvalLimitOpt = None,
    limit: OldLimitOpt = None,
    batch_size: BatchSizeOpt = 512,
    json_out: JsonOpt = False,
) -> None:
    """Accuracy of a model on the standard (single-digit) test set, overall and per class.

    Classes are named by the model's class names (digits for a model without them); --json gives
    the per-class accuracies as "per_class": {name: accuracy}, null for a class with no test image.

    Example: capsctl eval runs/capsule/model.safetensors --json
    """
    import json

    import numpy as np

    from capsctl.backend import get_backend
    from capsctl.cli._options import check_range, data_args, renamed
    from capsctl.data.composites import single_accuracy
    from capsctl.model.fit import check_fit
    from capsctl.model.spec import names_of
    from capsctl.model.weights import load_model

    limit = renamed("--eval-limit", eval_limit, "--limit", limit)
    check_range("--eval-limit" if eval_limit is not None else "--limit", limit, 1)
    check_range("--batch-size", batch_size, 1, 65536)
    spec, weights = load_model(model)
    dataset_name = str(dataset)
    test = _test_split(dataset_name, data_dir, image_size, holdout, val_fraction, spec, model)
    x, y = (test.images[:limit], test.labels[:limit]) if limit else (test.images, test.labels)
    again = data_args(dataset_name, data_dir, image_size, holdout, val_fraction)
    check_fit(spec, x, y, str(model), f"{dataset_name} test images", single_digits=True, data_args=again)
    runner = get_backend(backend).runner(spec, weights)
    scores = runner.scores(x, batch_size)
    acc = single_accuracy(scores, y)
    per_class = _per_class(names_of(spec), y[:, None], np.argmax(scores, axis=1)[:, None] == y[:, None])
    result = {
        "images": len(y),
        "accuracy": acc,
        "dataset": dataset_name,
        "backend": backend,
        **_split_fields(holdout, val_fraction),
        "per_class": per_class,
    }
    if json_out:
        typer.echo(json.dumps(result))
    else:
        what = _split_fields(holdout, val_fraction)["split"]
        typer.echo(f"{model}: {what} accuracy {acc:.2%} on {len(y)} {dataset_name} images ({backend})")
        typer.echo(f"per class: {_per_class_line(per_class)}")


def eval_pairs(
    model: OptionalModelArg = None,
    backend: BackendOpt = "torch",
    dataset: DatasetOpt = "mnist-5k",
    data_dir: DataDirOpt = None,
    image_size: ImageSizeOpt = None,
    holdout: HoldoutOpt = None,
    val_fraction: ValFractionOpt = None,
    seed: Annotated[int, typer.Option(help="Seed of the composite pairing (numpy default_rng).")] = 0,
    layout: Annotated[
        Layout, typer.Option(help="vertical (stacked, the seed's), horizontal (side by side) or overlap.")
    ] = "vertical",
    digits: Annotated[int, typer.Option(help="Digits per composite.")] = 2,
    eval_limit: Annotated[int | None, eval_limit_option("composites")] = None,
    limit: OldLimitOpt = None,
    batch_size: BatchSizeOpt = 512,
    json_out: JsonOpt = False,
    reconstruction: Annotated[
        bool,
        typer.Option(
            "--reconstruction",
            help="Also score the decoder: mean squared error per pixel of each digit reconstructed from its "
            "own capsule, against that digit alone (models trained with --decoder).",
        ),
    ] = False,
) -> None:
    """Score a model on multi-digit composites of test images it never trained on.

    A composite counts as right when its k highest class scores are exactly its k digits
    (accuracy), and as confidently right when the k-th score is also above 0.5. Per class (named by
    the model's class names): the share of the composites holding that class in which it is among
    the k highest scores (--json: "per_class": {name: share}).

    --reconstruction (decoder models): each digit of a composite is reconstructed from its own
    class's capsule alone (every other capsule zeroed). A decoder trained on single digits draws a
    digit at the training image size (28x28), so the reconstruction is compared with the source test
    digit alone (28x28), not with the digit's place in the larger composite; one trained with
    `train --compose overlap` draws the canvas, and is compared with the digit alone at its place.
    The error is the mean squared error per pixel (0..1 pixel values), per digit position and
    overall, beside the same error for each digit reconstructed from its own single-digit image (the
    decoder's floor).

    With no MODEL, the model that ships with capsctl is scored (trained on the embedded mnist-5k set).

    Example: capsctl eval-pairs runs/capsule/model.safetensors --layout horizontal --digits 2 --json
    """
    import json

    import numpy as np

    from capsctl.backend import get_backend
    from capsctl.cli._options import check_range, data_args, renamed
    from capsctl.data.composites import make_composites, score_sets
    from capsctl.model.fit import check_fit
    from capsctl.model.spec import names_of
    from capsctl.model.weights import load_model

    model = model if model is not None else shipped_model_said()
    limit = renamed("--eval-limit", eval_limit, "--limit", limit)
    check_range("--eval-limit" if eval_limit is not None else "--limit", limit, 1)
    check_range("--digits", digits, 2, 10)
    check_range("--batch-size", batch_size, 1, 65536)
    check_range("--seed", seed, 0)
    spec, weights = load_model(model)
    if reconstruction:
        from capsctl.inspect.reconstruction import check_decoder

        check_decoder(spec, model, "--reconstruction")
    if digits >= spec.num_classes:
        from capsctl.errors import CapsctlError

        # (the top k of k classes is every class: any model, trained or not, scored 100%)
        j = spec.num_classes
        raise CapsctlError(
            f"--digits {digits}: a {j}-class model's top {j} scores are all its classes, so every composite "
            "would count as right; "
            + (f"give --digits 2..{j - 1}" if j > 2 else "composites need a model of 3 classes or more")
        )
    test = _test_split(str(dataset), data_dir, image_size, holdout, val_fraction, spec, model)
    comp = make_composites(
        test.images, test.labels, digits=digits, layout=str(layout), seed=seed, limit=limit,
        light=spec.background == "light",
    )
    fixed = spec.head == "capsule" and not spec.capsule.shared
    if fixed and not _takes(spec, *comp.images.shape[1:3]):
        from capsctl.errors import CapsctlError
        from capsctl.model.fit import overlap_hint

        h, w = int(test.images.shape[1]), int(test.images.shape[2])
        again = data_args(str(dataset), data_dir, image_size, holdout, val_fraction)
        hint = overlap_hint(spec, h, w, str(model), again) if str(layout) != "overlap" else ""
        raise CapsctlError(
            f"{model}: this model's capsule weights are not shared "
            f"(fixed to {spec.capsule.num_inputs} inputs); "
            f"{comp.images.shape[1]}x{comp.images.shape[2]} composites need a shared-weight model"
            + hint
        )
    check_fit(spec, comp.images, comp.labels, str(model), f"{dataset} {layout} composites")
    if reconstruction:
        _check_decoder_draws(spec, test.images.shape[1:], comp, str(layout), model)
    runner = get_backend(backend).runner(spec, weights)
    scores = runner.scores(comp.images, batch_size)
    result: dict[str, object] = {**score_sets(scores, comp.labels)}
    result.update({"seed": seed, "layout": str(layout), "digits": digits, "dataset": str(dataset)})
    result.update({"backend": backend, **_split_fields(holdout, val_fraction)})
    top = np.argsort(-scores, axis=1, kind="stable")[:, :digits]  # as score_sets ranks them
    found = (comp.labels[:, :, None] == top[:, None, :]).any(axis=2)  # (M, k): each digit in the top k
    result["per_class"] = _per_class(names_of(spec), comp.labels, found)
    if reconstruction:
        from capsctl.data.composites import alone as digit_alone
        from capsctl.data.composites import reconstruction_errors

        errors = reconstruction_errors(runner, comp, test.images, batch_size)
        # a decoder trained on overlap pairs draws their canvas: its floor is each digit alone at its place
        assert spec.decoder is not None
        in_canvas = comp.offsets is not None and spec.decoder.image_shape == comp.images.shape[1:]
        alone = np.stack(
            [
                reconstruction_errors(
                    runner, digit_alone(comp, p, test.images, in_canvas), test.images, batch_size
                )[:, 0]
                for p in range(digits)
            ],
            axis=1,
        )
        result["reconstruction_mse"] = float(errors.mean())
        result["reconstruction_mse_by_position"] = [float(e) for e in errors.mean(axis=0)]
        result["reconstruction_mse_alone"] = float(alone.mean())
    if json_out:
        typer.echo(json.dumps(result))
        return
    from rich.table import Table

    from capsctl._console import out

    of = "" if _split_fields(holdout, val_fraction)["split"] == "test" else " of held-out images"
    table = Table(title=f"{model} — {digits}-digit {layout} composites{of} ({dataset}, {backend})")
    table.add_column("composites", justify="right")
    table.add_column("accuracy", justify="right")
    table.add_column("confident (k-th score > 0.5)", justify="right")
    cells = [str(result["pairs"]), f"{result['accuracy']:.2%}", f"{result['confident_accuracy']:.2%}"]
    if reconstruction:
        table.add_column("reconstruction MSE/pixel (by position)", justify="right")
        table.add_column("same digits alone", justify="right")
        by_pos = ", ".join(f"{e:.4f}" for e in result["reconstruction_mse_by_position"])  # type: ignore[attr-defined]
        mse, alone_mse = result["reconstruction_mse"], result["reconstruction_mse_alone"]
        cells += [f"{mse:.4f} ({by_pos})", f"{alone_mse:.4f}"]
    table.add_row(*cells)
    out.print(table)
    per_class = result["per_class"]
    assert isinstance(per_class, dict)
    line = f"found in the top {digits}, per class: {_per_class_line(per_class)}"
    out.print(line, soft_wrap=True, markup=False, highlight=False)


def _per_class(names: "Sequence[str]", labels: "np.ndarray", hit: "np.ndarray") -> "dict[str, float | None]":
    """{class name: share of the items of that class that `hit` marks}; labels and hit alike shaped
    (N, k), k items per image; None for a class with no item."""
    import numpy as np

    out: dict[str, float | None] = {}
    for j, name in enumerate(names):
        mine = labels == j
        out[name] = float(hit[mine].mean()) if np.any(mine) else None
    return out


def _per_class_line(per_class: dict[str, float | None]) -> str:
    return ", ".join(f"{name} {'—' if v is None else f'{v:.2%}'}" for name, v in per_class.items())


def _check_decoder_draws(
    spec: "ModelSpec", digit: tuple[int, ...], comp: "Composites", layout: str, model: Path
) -> None:
    """Before any scoring: the decoder draws either a test digit (compared with the source digit) or, with
    --layout overlap, the composite's canvas it trained on (compared with the digit at its place)."""
    from capsctl.errors import CapsctlError
    from capsctl.training.compose import canvas

    assert spec.decoder is not None and spec.decoder.image_shape is not None  # (check_decoder)
    draws = tuple(spec.decoder.image_shape)
    if draws == tuple(digit) or (comp.offsets is not None and draws == tuple(comp.images.shape[1:])):
        return
    hint = ""
    if layout != "overlap" and draws[:2] == canvas(digit[0], digit[1]):
        hint = " (the overlap composites' canvas it trained on): add --layout overlap"
    raise CapsctlError(
        f"{model}: --reconstruction: its decoder draws {draws[0]}x{draws[1]} images{hint}; the test "
        f"digits are {digit[0]}x{digit[1]}"
    )


def _takes(spec: "ModelSpec", height: int, width: int) -> bool:
    """Whether the model's capsule weights fit height x width images (False when they are too small)."""
    from capsctl.errors import CapsctlError

    try:
        return spec.takes_size(height, width)
    except CapsctlError:
        return False
