"""`capsctl eval` and `capsctl eval-pairs`."""

from __future__ import annotations

from typing import Annotated

import typer

from capsctl.cli._options import BackendOpt, BatchOpt, DataDirOpt, DatasetOpt, JsonOpt, LimitOpt, ModelArg


def eval_model(
    model: ModelArg,
    backend: BackendOpt = "torch",
    dataset: DatasetOpt = "mnist",
    data_dir: DataDirOpt = None,
    limit: LimitOpt = None,
    batch_size: BatchOpt = 512,
    json_out: JsonOpt = False,
) -> None:
    """Accuracy of a model on the standard (single-digit) test set."""
    import json

    from capsctl.backend import get_backend
    from capsctl.cli._options import check_range
    from capsctl.data import datasets
    from capsctl.data.composites import single_accuracy
    from capsctl.model.fit import check_fit
    from capsctl.model.weights import load_model

    check_range("--limit", limit, 1)
    check_range("--batch-size", batch_size, 1, 65536)
    spec, weights = load_model(model)
    test = datasets.load(dataset, data_dir).test()
    x, y = (test.images[:limit], test.labels[:limit]) if limit else (test.images, test.labels)
    check_fit(spec, x, y, str(model), f"{dataset} test images")
    runner = get_backend(backend).runner(spec, weights)
    acc = single_accuracy(runner.scores(x, batch_size), y)
    result = {"images": len(y), "accuracy": acc, "dataset": dataset, "backend": backend}
    if json_out:
        typer.echo(json.dumps(result))
    else:
        typer.echo(f"{model}: test accuracy {acc:.2%} on {len(y)} {dataset} images ({backend})")


def eval_pairs(
    model: ModelArg,
    backend: BackendOpt = "torch",
    dataset: DatasetOpt = "mnist",
    data_dir: DataDirOpt = None,
    seed: Annotated[int, typer.Option(help="Seed of the composite pairing (numpy default_rng).")] = 0,
    layout: Annotated[str, typer.Option(help="vertical (stacked, the seed's), horizontal (side by side) or overlap.")] = "vertical",
    digits: Annotated[int, typer.Option(help="Digits per composite.")] = 2,
    limit: LimitOpt = None,
    batch_size: BatchOpt = 512,
    json_out: JsonOpt = False,
) -> None:
    """Score a model on multi-digit composites of test images it never trained on.

    A composite counts as right when its k highest class scores are exactly its k digits
    (accuracy), and as confidently right when the k-th score is also above 0.5.
    """
    import json

    from capsctl.backend import get_backend
    from capsctl.cli._options import check_range
    from capsctl.data import datasets
    from capsctl.data.composites import make_composites, score_sets
    from capsctl.model.fit import check_fit
    from capsctl.model.weights import load_model

    check_range("--limit", limit, 1)
    check_range("--digits", digits, 2, 10)
    check_range("--batch-size", batch_size, 1, 65536)
    check_range("--seed", seed, 0)
    spec, weights = load_model(model)
    if digits > spec.num_classes:
        check_range("--digits", digits, 2, spec.num_classes)
    test = datasets.load(dataset, data_dir).test()
    comp = make_composites(test.images, test.labels, digits=digits, layout=layout, seed=seed, limit=limit)
    if spec.head == "capsule" and not spec.capsule.shared:
        gh, gw = spec.trunk_grid(*comp.images.shape[1:3])
        if gh * gw != spec.capsule.num_inputs:
            from capsctl.errors import CapsctlError

            raise CapsctlError(
                f"{model}: this model's capsule weights are not shared (fixed to {spec.capsule.num_inputs} inputs); "
                f"{comp.images.shape[1]}x{comp.images.shape[2]} composites need a shared-weight model"
            )
    check_fit(spec, comp.images, comp.labels, str(model), f"{dataset} {layout} composites")
    runner = get_backend(backend).runner(spec, weights)
    result: dict[str, object] = {**score_sets(runner.scores(comp.images, batch_size), comp.labels)}
    result.update({"seed": seed, "layout": layout, "digits": digits})
    if json_out:
        typer.echo(json.dumps(result))
        return
    from rich.table import Table

    from capsctl._console import out

    table = Table(title=f"{model} — {digits}-digit {layout} composites ({dataset}, {backend})")
    table.add_column("composites", justify="right")
    table.add_column("accuracy", justify="right")
    table.add_column("confident (k-th score > 0.5)", justify="right")
    table.add_row(str(result["pairs"]), f"{result['accuracy']:.2%}", f"{result['confident_accuracy']:.2%}")
    out.print(table)
