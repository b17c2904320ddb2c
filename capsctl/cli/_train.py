"""`capsctl train`."""

from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

from capsctl.cli._options import (
    DATA,
    MODEL,
    RECIPE,
    RUN,
    Dataset,
    Head,
    Recipe,
    Routing,
    Schedule,
    Squash,
    backend_option,
    data_dir_option,
    dataset_option,
    eval_limit_option,
    json_option,
    limit_option,
    old_name,
    quiet_option,
)

if TYPE_CHECKING:
    from capsctl.model.spec import ModelSpec
    from capsctl.training.config import TrainConfig

# Options that shape a run. `--resume RUN` takes them from the run's checkpoint; giving one is refused
# rather than ignored. (--backend, --data-dir and --eval-limit may be given: they replace the run's.)
_FIXED_ON_RESUME = (
    "head",
    "routing",
    "squash",
    "routings",
    "shared",
    "spec_file",
    "dataset",
    "recipe",
    "epochs",
    "batch_size",
    "lr",
    "schedule",
    "shift",
    "scale",
    "weight_decay",
    "seed",
    "limit",
)
_RECIPE_DEFAULT = "from --recipe"


def train(
    ctx: typer.Context,
    head: Annotated[
        Head,
        typer.Option(
            help="capsule (dynamic routing) or pool (global average pooling).", rich_help_panel=MODEL
        ),
    ] = "capsule",
    routing: Annotated[
        Routing | None,
        typer.Option(
            help="Routing: su (replace logits), sabour (accumulate) or su-unit.",
            show_default="su",
            rich_help_panel=MODEL,
        ),
    ] = None,
    squash: Annotated[
        Squash | None,
        typer.Option(
            help="Squash: su s|s|/(0.5+|s|²) or sabour s|s|/(1+|s|²).",
            show_default="su",
            rich_help_panel=MODEL,
        ),
    ] = None,
    routings: Annotated[
        int | None, typer.Option(help="Routing iterations.", show_default="3", rich_help_panel=MODEL)
    ] = None,
    shared: Annotated[
        bool,
        typer.Option(
            "--shared/--no-shared",
            help="One capsule weight for all positions (any image size).",
            rich_help_panel=MODEL,
        ),
    ] = True,
    spec_file: Annotated[
        Path | None,
        typer.Option("--spec", help="A ModelSpec JSON file (overrides --head etc.).", rich_help_panel=MODEL),
    ] = None,
    dataset: Annotated[Dataset, dataset_option(DATA)] = "mnist-5k",
    data_dir: Annotated[Path | None, data_dir_option(DATA)] = None,
    limit: Annotated[int | None, limit_option(DATA)] = None,
    eval_limit: Annotated[int | None, eval_limit_option("test images after each epoch", DATA)] = None,
    test_limit: Annotated[int | None, old_name("--test-limit")] = None,
    recipe: Annotated[
        Recipe,
        typer.Option(
            help="default (measured best) or seed (the seed article's protocol).", rich_help_panel=RECIPE
        ),
    ] = "default",
    epochs: Annotated[
        int | None,
        typer.Option(
            help="Passes over the training set.", show_default=_RECIPE_DEFAULT, rich_help_panel=RECIPE
        ),
    ] = None,
    batch_size: Annotated[
        int | None,
        typer.Option(help="Images per step.", show_default=_RECIPE_DEFAULT, rich_help_panel=RECIPE),
    ] = None,
    lr: Annotated[
        float | None,
        typer.Option(help="(Peak) learning rate.", show_default=_RECIPE_DEFAULT, rich_help_panel=RECIPE),
    ] = None,
    schedule: Annotated[
        Schedule | None,
        typer.Option(help="Learning-rate schedule.", show_default=_RECIPE_DEFAULT, rich_help_panel=RECIPE),
    ] = None,
    shift: Annotated[
        int | None,
        typer.Option(
            help="Random ±pixels translation of training digits.",
            show_default=_RECIPE_DEFAULT,
            rich_help_panel=RECIPE,
        ),
    ] = None,
    scale: Annotated[
        float | None,
        typer.Option(
            help="Random zoom of training digits by 1 ± SCALE, e.g. 0.1.",
            show_default=_RECIPE_DEFAULT,
            rich_help_panel=RECIPE,
        ),
    ] = None,
    weight_decay: Annotated[
        float | None,
        typer.Option(
            help="AdamW decoupled weight decay.", show_default=_RECIPE_DEFAULT, rich_help_panel=RECIPE
        ),
    ] = None,
    seed: Annotated[
        int,
        typer.Option(help="Seed for initial weights, data order and augmentation.", rich_help_panel=RECIPE),
    ] = 0,
    backend: Annotated[str | None, backend_option(RUN)] = None,
    out: Annotated[
        Path | None,
        typer.Option(
            help="Run folder for model.safetensors, metrics.jsonl, checkpoint.",
            show_default="runs/HEAD",
            rich_help_panel=RUN,
        ),
    ] = None,
    resume: Annotated[
        Path | None,
        typer.Option(
            help="Continue the run in this folder from its last checkpoint, "
            "with the settings it was started with.",
            rich_help_panel=RUN,
        ),
    ] = None,
    quiet: Annotated[bool, quiet_option(RUN)] = False,
    json_out: Annotated[bool, json_option(RUN)] = False,
) -> None:
    """Train a capsule or pooling model on single digits.

    Writes RUN/model.safetensors (the model, readable by every backend), RUN/metrics.jsonl (one
    line per epoch) and RUN/checkpoint.safetensors. Ctrl-C saves and exits; a second Ctrl-C aborts
    at once. --resume RUN continues a stopped run exactly, with the settings it was started with
    (--backend torch|keras, --data-dir and --eval-limit may be given to replace the run's).
    --json prints the last epoch's metrics and the file paths as one object.

    Example: capsctl train --head capsule --data-dir ../shared/data/mnist-5k --out runs/caps
    """
    from capsctl.cli._options import check_range, renamed
    from capsctl.errors import CapsctlError

    eval_limit = renamed("--eval-limit", eval_limit, "--test-limit", test_limit)
    check_range("--eval-limit", eval_limit, 1)
    folder = str(data_dir.absolute()) if data_dir is not None else None
    if resume is not None:
        if out is not None and out != resume:
            raise CapsctlError("give either --out or --resume RUN, not both")
        from capsctl.training.run_folder import load_checkpoint

        ck = load_checkpoint(resume)
        given = [name for name in _FIXED_ON_RESUME if _given(ctx, name)]
        if given:
            flags = ", ".join(_flag(ctx, name) for name in given)
            raise CapsctlError(
                f"--resume {resume}: continues with the settings the run was started with; leave out {flags}"
            )
        from dataclasses import replace

        old = ck.config
        cfg = replace(
            old,
            backend=backend or old.backend,
            data_dir=folder or old.data_dir,
            eval_limit=eval_limit if eval_limit is not None else old.eval_limit,
        )
        _run(cfg, ck.spec, resume, data_dir or cfg.data_dir, resume=True, quiet=quiet, json_out=json_out)
        return

    spec = _spec(spec_file, head, routing, squash, routings, shared)
    from capsctl.training.config import TrainConfig
    from capsctl.training.recipes import get_recipe

    settings = get_recipe(str(recipe)).settings(
        spec.head,
        epochs=epochs,
        batch_size=batch_size,
        lr=lr,
        schedule=_str(schedule),
        shift=shift,
        scale=scale,
        weight_decay=weight_decay,
    )
    cfg = TrainConfig(
        backend=backend or "torch",
        dataset=str(dataset),
        seed=seed,
        limit=limit,
        recipe=str(recipe),
        data_dir=folder,
        eval_limit=eval_limit,
        **settings,
    )
    _run(
        cfg,
        spec,
        out if out is not None else Path("runs") / spec.head,
        data_dir,
        resume=False,
        quiet=quiet,
        json_out=json_out,
    )


def _str(choice: str | None) -> str | None:
    return None if choice is None else str(choice)  # a plain str for an Enum member


def _given(ctx: typer.Context, name: str) -> bool:
    source = ctx.get_parameter_source(name)
    return source is not None and source.name in ("COMMANDLINE", "ENVIRONMENT", "PROMPT")


def _flag(ctx: typer.Context, name: str) -> str:
    param = next(p for p in ctx.command.params if p.name == name)
    return max(param.opts, key=len)


def _spec(
    spec_file: Path | None,
    head: str,
    routing: Routing | None,
    squash: Squash | None,
    routings: int | None,
    shared: bool,
) -> "ModelSpec":
    from capsctl.cli._options import check_range
    from capsctl.errors import CapsctlError
    from capsctl.model.spec import ModelSpec

    if spec_file is not None:
        try:
            spec = ModelSpec.from_json(spec_file.read_text(encoding="utf-8"))
        except OSError as e:
            raise CapsctlError(f"--spec {spec_file}: cannot read ({e.strerror})") from None
        except UnicodeDecodeError:
            raise CapsctlError(f"--spec {spec_file}: not a text file (expected ModelSpec JSON)") from None
        except CapsctlError as e:
            raise CapsctlError(f"--spec {spec_file}: {e}") from None
    else:
        spec = ModelSpec(head=str(head))
    # checked here so the message names the option, not the spec field it sets
    check_range("--routings (capsule.routings)", routings, 1, 100)
    changes: dict[str, object] = {}
    for key, value in (("routing", routing), ("squash", squash), ("routings", routings)):
        if value is not None:
            changes[key] = value if isinstance(value, int) else str(value)
    if not shared:
        changes["shared"] = False
    return spec.with_capsule(**changes) if changes else spec


def _run(
    cfg: "TrainConfig",
    spec: "ModelSpec",
    run: Path,
    data_dir: Path | str | None,  # as given (messages name it so); cfg records it as an absolute path
    *,
    resume: bool,
    quiet: bool,
    json_out: bool,
) -> None:
    import json
    import shlex

    from capsctl.backend import get_backend
    from capsctl.data import datasets
    from capsctl.training.loop import train as run_training
    from capsctl.training.run_folder import CHECKPOINT_FILE, METRICS_FILE, MODEL_FILE

    be = get_backend(cfg.backend)
    ds = datasets.load(cfg.dataset, data_dir)
    train_split = ds.train()
    if spec.head == "capsule" and not spec.capsule.shared and spec.capsule.num_inputs is None:
        gh, gw = spec.trunk_grid(*train_split.images.shape[1:3])
        spec = spec.with_capsule(num_inputs=gh * gw)
    rows = run_training(be, spec, cfg, train_split, ds.test(), run, resume=resume, show_progress=not quiet)
    if not json_out:
        model = run / MODEL_FILE
        typer.echo(f"model: {model}")
        # the run's last line says what to try next with it
        data = f" --data-dir {shlex.quote(str(data_dir))}" if data_dir is not None else ""
        if cfg.dataset != "mnist-5k":
            data += f" --dataset {cfg.dataset}"
        typer.echo(f"next: capsctl eval-pairs {shlex.quote(str(model))}{data}")
        return
    last: dict[str, Any] = rows[-1] if rows else {"epoch": 0}
    result = {
        "run": str(run),
        "model": str(run / MODEL_FILE),
        "metrics": str(run / METRICS_FILE),
        "checkpoint": str(run / CHECKPOINT_FILE),
        "head": spec.head,
        "backend": cfg.backend,
        "epochs": cfg.epochs,
        **last,
    }
    typer.echo(json.dumps(result))
