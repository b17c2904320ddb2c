"""`capsctl experiment pairs|ablate|report`: reproducible experiments and the results document."""

from __future__ import annotations

import shlex
from pathlib import Path
from typing import Annotated

import typer

from capsctl.cli._options import BackendOpt, DataDirOpt, DatasetOpt

app = typer.Typer(
    help="Reproduce the paired-digit result and its ablations; tables, plots and docs/RESULTS.md.",
    no_args_is_help=True,
)

OutOpt = Annotated[Path, typer.Option(help="Result folder: runs/, results.json, results.md, PNG plots.")]
RecipeOpt = Annotated[str, typer.Option(help="Training recipe: default (measured best) or seed (the seed article's).")]
TrainLimitOpt = Annotated[int | None, typer.Option("--limit", help="Train on the first N images only (smoke runs).")]
EvalLimitOpt = Annotated[int | None, typer.Option(help="Score only the first N test images / composites of each test.")]
QuietOpt = Annotated[bool, typer.Option("--quiet", "-q", help="No progress bars.")]


def _command(name: str, values: dict[str, object]) -> str:
    """The canonical command line for these options (recorded in results.json and RESULTS.md)."""
    parts = ["capsctl", "experiment", name]
    for key, value in values.items():
        if value is None or value is False:
            continue
        flag = "--" + key.replace("_", "-")
        parts += [flag] if value is True else [flag, str(value)]
    return shlex.join(parts)


def pairs(
    backend: BackendOpt = "torch",
    dataset: DatasetOpt = "mnist",
    data_dir: DataDirOpt = None,
    recipe: RecipeOpt = "default",
    epochs: Annotated[int | None, typer.Option(help="Epochs for both heads [recipe: capsule/pool].")] = None,
    seeds: Annotated[str, typer.Option(help="Training seeds, comma-separated.")] = "0,1,2",
    heads: Annotated[str, typer.Option(help="Heads to train: capsule,pool.")] = "capsule,pool",
    tests: Annotated[str, typer.Option(help="Tests: test,vertical,horizontal,vertical3,overlap.")] = "test,vertical,horizontal,vertical3,overlap",
    limit: TrainLimitOpt = None,
    eval_limit: EvalLimitOpt = None,
    lr: Annotated[float | None, typer.Option(help="Override the recipe's (peak) learning rate.")] = None,
    schedule: Annotated[str | None, typer.Option(help="Override the recipe's schedule: constant or onecycle.")] = None,
    shift: Annotated[int | None, typer.Option(help="Override the recipe's ±pixel shift augmentation.")] = None,
    scale: Annotated[float | None, typer.Option(help="Override the recipe's zoom augmentation (factor 1 ± SCALE).")] = None,
    weight_decay: Annotated[float | None, typer.Option(help="Override the recipe's weight decay.")] = None,
    routing: Annotated[str | None, typer.Option(help="Capsule routing: su, su-unit or sabour [su].")] = None,
    squash: Annotated[str | None, typer.Option(help="Capsule squash: su or sabour [su].")] = None,
    routings: Annotated[int | None, typer.Option(help="Capsule routing iterations [3].")] = None,
    holdout: Annotated[int | None, typer.Option(
        help="Hold out N training images (a fixed random draw) and score on them and on composites built from "
             "them instead of the test set: choose a recipe here, never on the test set.")] = None,
    out: OutOpt = Path("out/pairs"),
    train: Annotated[bool, typer.Option("--train/--no-train", help="--no-train: tabulate finished models only.")] = True,
    quiet: QuietOpt = False,
) -> None:
    """Train the capsule and pooling heads (same trunk, seed and data) and score both.

    For each seed and head, trains in OUT/runs/BACKEND-RECIPE-HEAD-sSEED/ (a finished model is
    skipped, an unfinished one resumed), then scores the standard test set and the composites
    (vertical and horizontal pairs, 3-digit vertical, overlapping pairs; pairing seed 0). Writes
    OUT/results.json, OUT/results.md (head x test: accuracy and confident accuracy, mean ± std over
    seeds, parameters, train time) and PNG plots. Options such as --shift override one recipe
    setting, for recipe-choice comparisons (the run folder names then say so).

    Example: capsctl experiment pairs --data-dir ../shared/data/mnist-5k --seeds 0,1,2 --out out/pairs
    """
    from capsctl._console import out as console
    from capsctl.cli._options import check_range, parse_ints, parse_names
    from capsctl.experiment.plan import ALL_TESTS, Overrides, PairsPlan
    from capsctl.experiment.run import run_pairs
    from capsctl.model.spec import HEADS, ROUTINGS, SQUASHES

    check_range("--epochs", epochs, 1, 10000)
    check_range("--eval-limit", eval_limit, 1)
    check_range("--limit", limit, 1)
    check_range("--holdout", holdout, 1)
    if routing is not None:
        parse_names(routing, "--routing", ROUTINGS)
    if squash is not None:
        parse_names(squash, "--squash", SQUASHES)
    check_range("--routings", routings, 1, 100)
    plan = PairsPlan(
        backend=backend,
        dataset=dataset,
        data_dir=str(data_dir) if data_dir is not None else None,
        recipe=recipe,
        seeds=tuple(parse_ints(seeds, "--seeds")),
        heads=tuple(parse_names(heads, "--heads", HEADS)),
        limit=limit,
        eval_limit=eval_limit,
        tests=tuple(parse_names(tests, "--tests", ALL_TESTS)),
        overrides=Overrides(epochs=epochs, lr=lr, schedule=schedule, shift=shift, scale=scale, weight_decay=weight_decay,
                               routing=routing, squash=squash, routings=routings),
        holdout=holdout,
        train=train,
    )
    plan = PairsPlan(**{**plan.__dict__, "command": _command("pairs", {
        "backend": backend, "dataset": dataset, "data_dir": data_dir, "recipe": recipe, "epochs": epochs,
        "seeds": seeds, "heads": heads if heads != "capsule,pool" else None,
        "tests": tests if tests != "test,vertical,horizontal,vertical3,overlap" else None, "limit": limit,
        "eval_limit": eval_limit, "lr": lr, "schedule": schedule, "shift": shift, "scale": scale,
        "weight_decay": weight_decay, "routing": routing, "squash": squash, "routings": routings, "holdout": holdout,
        "out": out})})  # --no-train only tabulates, so the command that trains is recorded
    from capsctl.training.config import TrainConfig
    from capsctl.training.recipes import get_recipe

    rec = get_recipe(recipe)  # validate recipe and overrides before loading any data
    TrainConfig(**rec.settings("capsule", epochs=epochs, lr=lr, schedule=schedule, shift=shift, scale=scale,
                               weight_decay=weight_decay))
    run_pairs(plan, out, show_progress=not quiet)
    console.print((out / "results.md").read_text().split("\n![")[0], markup=False, highlight=False)
    typer.echo(f"results: {out / 'results.json'}")


def ablate(
    backend: BackendOpt = "torch",
    dataset: DatasetOpt = "mnist",
    data_dir: DataDirOpt = None,
    recipe: RecipeOpt = "default",
    routing: Annotated[str, typer.Option(help="Routing variants: su,su-unit,sabour.")] = "su,su-unit,sabour",
    squash: Annotated[str, typer.Option(help="Squash variants: su,sabour.")] = "su,sabour",
    iterations: Annotated[str, typer.Option(help="Routing iterations to train at, e.g. 1,2,3,5,8.")] = "1,2,3,5,8",
    eval_iterations: Annotated[str, typer.Option(help="Iterations at which the model trained at 3 is scored.")] = "1-8",
    epochs: Annotated[int | None, typer.Option(help="Epochs per model [recipe].")] = None,
    shift: Annotated[int | None, typer.Option(help="Override the recipe's ±pixel shift augmentation.")] = None,
    seed: Annotated[int, typer.Option(help="Training seed.")] = 0,
    tests: Annotated[str, typer.Option(help="Tests: test,vertical,horizontal,vertical3,overlap.")] = "test,vertical,horizontal",
    limit: TrainLimitOpt = None,
    eval_limit: EvalLimitOpt = None,
    out: OutOpt = Path("out/ablate"),
    quiet: QuietOpt = False,
) -> None:
    """Routing variant x squash x routing iterations: paired accuracy against iterations.

    For each routing (su, su-unit, sabour) and squash (su, sabour), trains a capsule model at
    every --iterations count, and scores the one trained at 3 at every --eval-iterations count.
    Writes OUT/results.json, OUT/results.md and a plot of paired accuracy (mean of vertical and
    horizontal pairs) against iterations, one line per variant. Finished models are skipped.

    Example: capsctl experiment ablate --data-dir ../shared/data/mnist-5k --epochs 10 --out out/ablate
    """
    from capsctl._console import out as console
    from capsctl.cli._options import check_range, parse_ints, parse_names
    from capsctl.experiment.plan import ALL_TESTS, AblatePlan
    from capsctl.experiment.run import run_ablate
    from capsctl.model.spec import ROUTINGS, SQUASHES

    check_range("--epochs", epochs, 1, 10000)
    check_range("--seed", seed, 0)
    check_range("--eval-limit", eval_limit, 1)
    check_range("--limit", limit, 1)
    plan = AblatePlan(
        backend=backend,
        dataset=dataset,
        data_dir=str(data_dir) if data_dir is not None else None,
        recipe=recipe,
        seed=seed,
        routings=tuple(parse_names(routing, "--routing", ROUTINGS)),
        squashes=tuple(parse_names(squash, "--squash", SQUASHES)),
        iterations=tuple(parse_ints(iterations, "--iterations", 1, 100)),
        eval_iterations=tuple(parse_ints(eval_iterations, "--eval-iterations", 1, 100)),
        epochs=epochs,
        shift=shift,
        limit=limit,
        eval_limit=eval_limit,
        tests=tuple(parse_names(tests, "--tests", ALL_TESTS)),
        command=_command("ablate", {
            "backend": backend, "dataset": dataset, "data_dir": data_dir, "recipe": recipe, "routing": routing,
            "squash": squash, "iterations": iterations, "eval_iterations": eval_iterations, "epochs": epochs,
            "shift": shift, "seed": seed, "tests": tests, "limit": limit, "eval_limit": eval_limit, "out": out}),
    )
    from capsctl.training.recipes import get_recipe

    rec = get_recipe(recipe)
    from capsctl.training.config import TrainConfig

    TrainConfig(**rec.settings("capsule", epochs=epochs, shift=shift))  # validate before loading any data
    run_ablate(plan, out, show_progress=not quiet)
    console.print((out / "results.md").read_text().split("\n![")[0], markup=False, highlight=False)
    typer.echo(f"results: {out / 'results.json'}")


def report(
    folders: Annotated[list[Path], typer.Argument(help="Result folders written by `experiment pairs` / `ablate`.")],
    out: Annotated[Path, typer.Option(help="The Markdown file to write; plots are copied beside it.")] = Path("docs/RESULTS.md"),
) -> None:
    """Regenerate docs/RESULTS.md from result folders (tables, plots, commands, times, reference numbers).

    Reads each FOLDER/results.json (no training, no scoring), copies its PNG plots to
    OUT's folder/results/, and writes OUT with every table beside the command that produced it.
    """
    from capsctl.experiment.report import write_report

    write_report(folders, out)
    typer.echo(f"wrote {out}")


app.command("pairs")(pairs)
app.command("ablate")(ablate)
app.command("report")(report)
