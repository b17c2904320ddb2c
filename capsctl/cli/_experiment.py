"""`capsctl experiment pairs|ablate|report`: reproducible experiments and the results document."""

import shlex
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, cast

import typer

from capsctl import choices
from capsctl.cli._options import (
    DATA,
    MODEL,
    RECIPE,
    RUN,
    Arch,
    Compose,
    Head,
    Recipe,
    Routing,
    Schedule,
    Squash,
    Test,
    backend_option,
    data_dir_option,
    dataset_option,
    eval_limit_option,
    image_size_option,
    ints_option,
    limit_option,
    names_option,
    quiet_option,
    renamed,
    val_fraction_option,
)
from capsctl.training.config import RANGE_TEXT

app = typer.Typer(
    help="Reproduce the paired-digit result and its ablations; tables, plots and docs/RESULTS.md.",
    no_args_is_help=True,
    rich_markup_mode="markdown",
)

# options both experiments share, each in its help panel
BackendOpt = Annotated[str, backend_option(RUN)]
DatasetOpt = Annotated[str, dataset_option(DATA)]
DataDirOpt = Annotated[Path | None, data_dir_option(DATA)]
TrainLimitOpt = Annotated[int | None, limit_option(DATA)]
EvalLimitOpt = Annotated[int | None, eval_limit_option("test images / composites of each test", DATA)]
OutOpt = Annotated[
    Path, typer.Option(help="Result folder: runs/, results.json, results.md, PNG plots.", rich_help_panel=RUN)
]
RecipeOpt = Annotated[
    Recipe,
    typer.Option(
        help="Training recipe: default (measured best), default-2026-11 (the default until 2026-11-29) or "
        "seed (the seed article's).",
        rich_help_panel=RECIPE,
    ),
]
QuietOpt = Annotated[bool, quiet_option(RUN)]
ArchOpt = Annotated[
    Arch,
    typer.Option(
        help="Architecture of the capsule models (capsctl train --arch): seed, sabour2017, efficient or "
        "efficient-multimnist (with --compose overlap). All but seed fix the image size (non-shared capsule "
        "weights): the tests of other sizes are left out for them.",
        rich_help_panel=MODEL,
    ),
]
AblateArchOpt = Annotated[
    Arch,
    typer.Option(
        help="Architecture of the capsule models (capsctl train --arch): seed, sabour2017, efficient or "
        "efficient-multimnist (made for 36x36 composites, which ablate does not train: it needs images of "
        "at least that size). All but seed fix the image size (non-shared capsule weights): ablate then "
        "scores, and plots, the standard test set only.",
        rich_help_panel=MODEL,
    ),
]
_PRESETS_SU = "the --arch preset's; seed: su"
_TESTS_HELP = "Tests to score: the standard test set and composites (vertical3: three digits stacked)."
_PAIRS_TESTS = list(choices.ALL_TESTS)
_ABLATE_TESTS = ["test", "vertical", "horizontal"]
_HEADS = list(choices.HEADS)
_ROUTINGS, _SQUASHES = list(choices.ABLATE_ROUTINGS), list(choices.ABLATE_SQUASHES)
_SEEDS, _TRAINED_AT, _SCORED_AT = ["0,1,2"], ["1,2,3,5,8"], ["1-8"]


def _command(name: str, values: dict[str, object]) -> str:
    """The canonical command line for these options (recorded in results.json and RESULTS.md)."""
    parts = ["capsctl", "experiment", name]
    for key, value in values.items():
        if value is None or value is False:
            continue
        flag = "--" + key.replace("_", "-")
        if isinstance(value, (list, tuple)):
            value = ",".join(map(str, value))
        parts += [flag] if value is True else [flag, str(value)]
    return shlex.join(parts)


def _value(choice: str | None) -> str | None:
    return None if choice is None else str(choice)  # a plain str for an Enum member


# the same override on both experiments
ShiftOpt = Annotated[
    int | None,
    typer.Option(
        help=f"Override the recipe's ±pixel shift augmentation ({RANGE_TEXT['shift']}).",
        rich_help_panel=RECIPE,
    ),
]
BatchSizeOverrideOpt = Annotated[
    int | None,
    typer.Option(
        help=f"Override the recipe's images per step ({RANGE_TEXT['batch_size']}).", rich_help_panel=RECIPE
    ),
]


def pairs(
    ctx: typer.Context,
    dataset: DatasetOpt = "mnist-5k",
    image_size: Annotated[str | None, image_size_option(DATA)] = None,
    data_dir: DataDirOpt = None,
    limit: TrainLimitOpt = None,
    eval_limit: EvalLimitOpt = None,
    holdout: Annotated[
        int | None,
        typer.Option(
            help="Hold out N training images (a fixed random draw) and score on them and on composites "
            "built from them instead of the test set: choose a recipe here, never on the test set. A "
            "--dataset folder without test/ needs this or --val-fraction.",
            rich_help_panel=DATA,
        ),
    ] = None,
    val_fraction: Annotated[float | None, val_fraction_option(DATA)] = None,
    tests: Annotated[list[str], names_option(Test, "--tests", help=_TESTS_HELP, panel=DATA)] = _PAIRS_TESTS,
    recipe: RecipeOpt = "default",
    seeds: Annotated[list[str], ints_option("--seeds", help="Training seeds.", panel=RECIPE)] = _SEEDS,
    epochs: Annotated[
        int | None,
        typer.Option(
            help="Epochs for both heads (1–10000).", show_default="recipe's", rich_help_panel=RECIPE
        ),
    ] = None,
    batch_size: BatchSizeOverrideOpt = None,
    lr: Annotated[
        float | None,
        typer.Option(
            help=f"Override the recipe's (peak) learning rate ({RANGE_TEXT['lr']}).", rich_help_panel=RECIPE
        ),
    ] = None,
    schedule: Annotated[
        Schedule | None, typer.Option(help="Override the recipe's schedule.", rich_help_panel=RECIPE)
    ] = None,
    shift: ShiftOpt = None,
    scale: Annotated[
        float | None,
        typer.Option(
            help=f"Override the recipe's zoom augmentation (factor 1 ± SCALE; {RANGE_TEXT['scale']}).",
            rich_help_panel=RECIPE,
        ),
    ] = None,
    weight_decay: Annotated[
        float | None,
        typer.Option(
            help=f"Override the recipe's weight decay ({RANGE_TEXT['weight_decay']}).", rich_help_panel=RECIPE
        ),
    ] = None,
    heads: Annotated[list[str], names_option(Head, "--heads", help="Heads to train.", panel=MODEL)] = _HEADS,
    arch: ArchOpt = "seed",
    compose: Annotated[
        Compose | None,
        typer.Option(
            help="Train every model on composites, as `capsctl train --compose`: overlap (MultiMNIST) pairs "
            "each training digit with one of another class in a (H+8)x(W+8) canvas, re-drawn every epoch. "
            "A model with non-shared capsule weights is then scored on overlap pairs only.",
            show_default="single digits",
            rich_help_panel=RECIPE,
        ),
    ] = None,
    decoder: Annotated[
        bool,
        typer.Option(
            "--decoder",
            help="Also train the capsule head with the reconstruction decoder (rows capsule+decoder, "
            "as `capsctl train --decoder`) and say whether it helps or hurts. Not with an --arch that has a "
            "decoder already (sabour2017: its capsule rows are trained with it).",
            rich_help_panel=MODEL,
        ),
    ] = False,
    routing: Annotated[
        Routing | None,
        typer.Option(help="Capsule routing.", show_default=_PRESETS_SU, rich_help_panel=MODEL),
    ] = None,
    squash: Annotated[
        Squash | None,
        typer.Option(help="Capsule squash.", show_default=_PRESETS_SU, rich_help_panel=MODEL),
    ] = None,
    routings: Annotated[
        int | None,
        typer.Option(
            help="Capsule routing iterations (1–100).",
            show_default="the --arch preset's; seed: 3",
            rich_help_panel=MODEL,
        ),
    ] = None,
    backend: BackendOpt = "torch",
    out: OutOpt = Path("out/pairs"),
    train: Annotated[
        bool,
        typer.Option(
            "--train/--no-train", help="--no-train: tabulate finished models only.", rich_help_panel=RUN
        ),
    ] = True,
    quiet: QuietOpt = False,
) -> None:
    """Train the capsule and pooling heads (same trunk, seed and data) and score both.

    For each seed and head, trains in OUT/runs/BACKEND-RECIPE-HEAD-sSEED/ (a finished model is
    skipped, an unfinished one resumed), then scores the standard test set and the composites
    (vertical and horizontal pairs, 3-digit vertical, overlapping pairs; pairing seed 0). Writes
    OUT/results.json, OUT/results.md (head x test: accuracy and confident accuracy, mean ± std over
    seeds, parameters, train time) and PNG plots. Options such as --shift override one recipe
    setting, for recipe-choice comparisons (the run folder names then say so).

    --decoder adds the capsule head with the reconstruction decoder (HEAD capsule-decoder, configured
    as `capsctl train --decoder`, so a run folder that command made counts as finished), its
    reconstruction error per test, and whether the decoder helps or hurts each test's accuracy.

    Example: capsctl experiment pairs --seeds 0,1,2 --out out/pairs
    """
    from capsctl.cli._options import check_range
    from capsctl.experiment.plan import Overrides, PairsPlan
    from capsctl.experiment.run import run_pairs

    seed_list = cast("list[int]", seeds)  # the option's callback made them ints
    check_range("--epochs", epochs, 1, 10000)
    check_range("--batch-size", batch_size, 1)
    check_range("--eval-limit", eval_limit, 1)
    check_range("--limit", limit, 1)
    check_range("--holdout", holdout, 1)
    from capsctl.data.sources import check_val_fraction
    from capsctl.errors import CapsctlError

    check_val_fraction(val_fraction)
    if holdout is not None and val_fraction is not None:
        raise CapsctlError("give --holdout N or --val-fraction F, not both")
    check_range("--routings", routings, 1, 100)
    from capsctl.data.sources import parse_image_size

    parse_image_size(image_size)  # a bad --image-size is refused before anything runs
    composed = _value(compose)
    from capsctl.cli._options import given

    heads, tests, note = _for_arch(str(arch), heads, tests, composed, heads_given=given(ctx, "heads"))
    from capsctl.model.presets import preset

    if routings is not None and (_value(routing) or preset(str(arch)).capsule.routing) == "attention":
        # (as `train` refuses it: each capsule model would be the same as without it, trained again)
        raise CapsctlError("--routings: attention routing runs in one pass; it has no iterations to set")
    if decoder and preset(str(arch)).decoder is not None:  # both rows would be the same model
        raise CapsctlError(
            f"--decoder: --arch {arch} has a decoder already (its capsule rows are trained with it); leave "
            "--decoder out"
        )
    plan = PairsPlan(
        backend=backend,
        dataset=str(dataset),
        data_dir=str(data_dir) if data_dir is not None else None,
        recipe=str(recipe),
        arch=str(arch),
        seeds=tuple(seed_list),
        heads=tuple(heads),
        limit=limit,
        eval_limit=eval_limit,
        tests=tuple(tests),
        overrides=Overrides(
            epochs=epochs,
            batch_size=batch_size,
            lr=lr,
            schedule=_value(schedule),
            shift=shift,
            scale=scale,
            weight_decay=weight_decay,
            routing=_value(routing),
            squash=_value(squash),
            routings=routings,
        ),
        holdout=holdout,
        val_fraction=val_fraction,
        train=train,
        decoder=decoder,
        image_size=image_size,
        compose=composed,
    )
    plan = PairsPlan(
        **{
            **plan.__dict__,
            "command": _command(
                "pairs",
                {
                    "backend": backend,
                    "dataset": str(dataset),
                    "image_size": image_size,
                    "data_dir": data_dir,
                    "recipe": str(recipe),
                    "arch": str(arch) if str(arch) != "seed" else None,
                    "epochs": epochs,
                    "batch_size": batch_size,
                    "seeds": seed_list,
                    "heads": heads if heads != _HEADS else None,
                    "compose": composed,
                    "decoder": decoder,
                    "tests": tests if tests != _PAIRS_TESTS else None,
                    "limit": limit,
                    "eval_limit": eval_limit,
                    "lr": lr,
                    "schedule": _value(schedule),
                    "shift": shift,
                    "scale": scale,
                    "weight_decay": weight_decay,
                    "routing": _value(routing),
                    "squash": _value(squash),
                    "routings": routings,
                    "holdout": holdout,
                    "val_fraction": val_fraction,
                    "out": out,
                },
            ),
        }
    )  # --no-train only tabulates, so the command that trains is recorded
    from capsctl.training.config import TrainConfig
    from capsctl.training.recipes import get_recipe

    rec = get_recipe(str(recipe))  # check the overrides before loading any data
    TrainConfig(
        **rec.settings(
            "capsule",
            epochs=epochs,
            batch_size=batch_size,
            lr=lr,
            schedule=_value(schedule),
            shift=shift,
            scale=scale,
            weight_decay=weight_decay,
        )
    )
    from capsctl._console import set_quiet

    set_quiet(quiet)  # (the data loaders' own bars too)
    run_pairs(plan, out, show_progress=not quiet, planned=_say(note))
    _show_tables(out)
    typer.echo(f"results: {out / 'results.json'}")


def ablate(
    dataset: DatasetOpt = "mnist-5k",
    data_dir: DataDirOpt = None,
    limit: TrainLimitOpt = None,
    eval_limit: EvalLimitOpt = None,
    tests: Annotated[list[str], names_option(Test, "--tests", help=_TESTS_HELP, panel=DATA)] = _ABLATE_TESTS,
    recipe: RecipeOpt = "default",
    seed: Annotated[int, typer.Option(help="Training seed.", rich_help_panel=RECIPE)] = 0,
    epochs: Annotated[
        int | None,
        typer.Option(help="Epochs per model (1–10000).", show_default="recipe's", rich_help_panel=RECIPE),
    ] = None,
    shift: ShiftOpt = None,
    routing: Annotated[
        list[str], names_option(Routing, "--routing", help="Routing variants.", panel=MODEL)
    ] = _ROUTINGS,
    squash: Annotated[
        list[str], names_option(Squash, "--squash", help="Squash variants.", panel=MODEL)
    ] = _SQUASHES,
    arch: AblateArchOpt = "seed",
    routings: Annotated[
        list[str],
        ints_option("--routings", help="Routing iterations to train at.", lo=1, hi=100, panel=MODEL),
    ] = _TRAINED_AT,
    iterations: Annotated[
        list[str] | None, ints_option("--iterations", help="", lo=1, hi=100, hidden=True)
    ] = None,
    eval_routings: Annotated[
        list[str],
        ints_option(
            "--eval-routings",
            help="Iterations at which the model trained at 3 is scored.",
            lo=1,
            hi=100,
            panel=MODEL,
        ),
    ] = _SCORED_AT,
    eval_iterations: Annotated[
        list[str] | None, ints_option("--eval-iterations", help="", lo=1, hi=100, hidden=True)
    ] = None,
    backend: BackendOpt = "torch",
    out: OutOpt = Path("out/ablate"),
    quiet: QuietOpt = False,
) -> None:
    """Routing variant x squash x routing iterations: paired accuracy against iterations.

    For each --routing variant (su, su-unit, sabour) and --squash (su, sabour), trains a capsule
    model at every --routings count and at 3, and scores the one trained at 3 at every --eval-routings
    count. Writes OUT/results.json, OUT/results.md and a plot of paired accuracy (mean of vertical and
    horizontal pairs; without pair tests, the first of --tests) against iterations, one line per
    variant. Finished models are skipped.

    Example: capsctl experiment ablate --epochs 10 --out out/ablate
    """
    from capsctl.cli._options import check_range
    from capsctl.experiment.plan import AblatePlan
    from capsctl.experiment.run import run_ablate

    trained_at = cast(
        "list[int]", renamed("--routings", routings, "--iterations", iterations, [1, 2, 3, 5, 8])
    )
    scored_at = cast(
        "list[int]",
        renamed("--eval-routings", eval_routings, "--eval-iterations", eval_iterations, list(range(1, 9))),
    )
    check_range("--epochs", epochs, 1, 10000)
    check_range("--seed", seed, 0)
    check_range("--eval-limit", eval_limit, 1)
    check_range("--limit", limit, 1)
    _, tests, note = _for_arch(str(arch), ["capsule"], tests)
    plan = AblatePlan(
        backend=backend,
        dataset=str(dataset),
        data_dir=str(data_dir) if data_dir is not None else None,
        recipe=str(recipe),
        arch=str(arch),
        seed=seed,
        routings=tuple(routing),
        squashes=tuple(squash),
        iterations=tuple(trained_at),
        eval_iterations=tuple(scored_at),
        epochs=epochs,
        shift=shift,
        limit=limit,
        eval_limit=eval_limit,
        tests=tuple(tests),
        command=_command(
            "ablate",
            {
                "backend": backend,
                "dataset": str(dataset),
                "data_dir": data_dir,
                "recipe": str(recipe),
                "arch": str(arch) if str(arch) != "seed" else None,
                "routing": routing,
                "squash": squash,
                "routings": trained_at,
                "eval_routings": scored_at,
                "epochs": epochs,
                "shift": shift,
                "seed": seed,
                "tests": tests,
                "limit": limit,
                "eval_limit": eval_limit,
                "out": out,
            },
        ),
    )
    from capsctl.training.config import TrainConfig
    from capsctl.training.recipes import get_recipe

    rec = get_recipe(str(recipe))
    TrainConfig(**rec.settings("capsule", epochs=epochs, shift=shift))  # check before loading any data
    from capsctl._console import set_quiet

    set_quiet(quiet)  # (the data loaders' own bars too)
    run_ablate(plan, out, show_progress=not quiet, planned=_say(note))
    _show_tables(out)
    typer.echo(f"results: {out / 'results.json'}")


def report(
    folders: Annotated[
        list[Path],
        typer.Argument(
            metavar="FOLDER",
            help="Result folders written by `experiment pairs` / `ablate`, or folders of `capsctl bench "
            "--json` outputs (several runs of a command: their medians).",
        ),
    ],
    out: Annotated[Path, typer.Option(help="The Markdown file to write; plots are copied beside it.")] = Path(
        "docs/RESULTS.md"
    ),
    section: Annotated[
        str | None,
        typer.Option(
            help="Rewrite only the section with this title (between its markers; added before the first "
            "heading if OUT has none) and leave the rest of OUT as it is."
        ),
    ] = None,
) -> None:
    """Regenerate docs/RESULTS.md from result folders (tables, plots, commands, times, reference numbers).

    Reads each FOLDER/results.json (no training, no scoring), copies its PNG plots to
    results/FOLDER-NAME/ beside OUT, and writes OUT with every table beside the command that produced it.
    A FOLDER without results.json holding `capsctl bench --json` outputs (bench-1.json, bench-2.json, …)
    becomes a training-speed table per command: parameters, FLOPs, images/s and FLOP rate per backend,
    the median over its runs with each run's figure.
    --section TITLE rewrites one generated section only: results whose folders are gone stay in OUT.
    Without it OUT is rewritten whole but keeps the sections --section wrote (delete OUT first to drop
    them).

    Example: capsctl experiment report out/pairs out/ablate --out out/RESULTS.md
    """
    from capsctl.experiment.report import write_report

    write_report(folders, out, section)
    typer.echo(f"wrote {out}")


def merge(
    folders: Annotated[
        list[Path],
        typer.Argument(metavar="FOLDER", help="Result folders of one `experiment pairs`, other seeds."),
    ],
    out: Annotated[Path, typer.Option(help="The merged result folder to write (new, or an earlier merge).")],
) -> None:
    """Merge result folders that ran the same `experiment pairs` on different seeds into one.

    For seeds run on several machines or processes, or a seed added later whose first runs are gone:
    each model's scores are taken from its folder's results.json as they were (nothing is trained or
    scored again) and the means over seeds are computed anew. Every setting but the seeds must be the
    same (the experiment's, and each model's as it trained: a recipe's name has meant other settings over
    time), and each model may come from one folder only; a run one folder left unfinished may come from
    another. OUT (new, empty, or an earlier merge) gets results.json, results.md and the plots, all or
    none; its results.json keeps each folder's command, machine and date, and `experiment report` lists
    them under the merged command, which is their equivalent, never run as one.

    Example: capsctl experiment merge out/pairs-s01 out/pairs-s2 --out out/pairs
    """
    from capsctl.experiment.merge import merge_results

    merged = merge_results(folders, out)
    _show_tables(out)
    typer.echo(f"results: {out / 'results.json'} (seeds {', '.join(map(str, merged['seeds']))})")


app.command("pairs")(pairs)
app.command("ablate")(ablate)
app.command("report")(report)
app.command("merge")(merge)


def _for_arch(
    arch: str, heads: list[str], tests: list[str], compose: str | None = None, heads_given: bool = False
) -> tuple[list[str], list[str], str | None]:
    """The heads and tests an experiment on `arch` runs: its capsule model beside the seed's pool model
    (seed only), and only the tests its capsule weights can see (non-shared: the training size only,
    which with --compose overlap is the overlap pairs' canvas); and a note naming the tests left out,
    said once the experiment is planned (bad input stays one line)."""
    from capsctl.errors import CapsctlError
    from capsctl.model.presets import preset

    if arch == "seed":
        return heads, tests, None
    if not heads_given:  # (the default list): the preset's capsule model; a given pool is refused below
        heads = ["capsule"]
    if "pool" in heads:
        raise CapsctlError(f"--arch {arch} has a capsule head only: leave pool out of --heads")
    if not preset(arch).capsule.shared:
        seen = compose or "test"  # the one test of the training images' size
        kept, dropped = [t for t in tests if t == seen], [t for t in tests if t != seen]
        if not kept:  # (one line: the refusal, without the note)
            what = "overlap (the overlap pairs)" if compose else "test (the standard test set)"
            raise CapsctlError(f"--arch {arch}: of --tests, it can score only {what}")
        tests = kept
        if dropped:
            note = (
                f"note: --arch {arch} has non-shared capsule weights (it sees training-size images only): "
                f"leaving out {', '.join(dropped)}"
            )
            return heads, tests, note
    return heads, tests, None


def _say(note: str | None) -> Callable[[], None]:
    """What an experiment calls once planned: print `note` on stderr, if any."""
    return lambda: typer.echo(note, err=True) if note else None


def _show_tables(out: Path) -> None:
    """OUT/results.md on stdout without its plot links (soft_wrap: each table row printed whole, never cut
    at the console's width)."""
    from capsctl._console import out as console

    console.print(
        (out / "results.md").read_text().split("\n![")[0], markup=False, highlight=False, soft_wrap=True
    )
