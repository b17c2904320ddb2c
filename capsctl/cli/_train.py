"""`capsctl train`."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from capsctl.cli._options import BackendOpt, DataDirOpt, DatasetOpt, LimitOpt


def train(
    head: Annotated[str, typer.Option(help="capsule (dynamic routing) or pool (global average pooling).")] = "capsule",
    backend: BackendOpt = "torch",
    routing: Annotated[str | None, typer.Option(help="su (replace logits), sabour (accumulate) or su-unit.")] = None,
    squash: Annotated[str | None, typer.Option(help="su: s|s|/(0.5+|s|²) or sabour: s|s|/(1+|s|²).")] = None,
    routings: Annotated[int | None, typer.Option(help="Routing iterations (default 3).")] = None,
    shared: Annotated[bool, typer.Option("--shared/--no-shared", help="One capsule weight for all positions (any image size).")] = True,
    spec_file: Annotated[Path | None, typer.Option("--spec", help="A ModelSpec JSON file (overrides --head etc.).")] = None,
    dataset: DatasetOpt = "mnist",
    data_dir: DataDirOpt = None,
    recipe: Annotated[str, typer.Option(help="default (measured best) or seed (the seed article's protocol).")] = "default",
    epochs: Annotated[int | None, typer.Option(help="Passes over the training set (default: from --recipe).")] = None,
    batch_size: Annotated[int | None, typer.Option(help="Images per step (default: from --recipe, 128).")] = None,
    lr: Annotated[float | None, typer.Option(help="(Peak) learning rate (default: from --recipe).")] = None,
    schedule: Annotated[str | None, typer.Option(help="constant or onecycle (default: from --recipe).")] = None,
    shift: Annotated[int | None, typer.Option(help="Random ±pixels translation of training digits (default: from --recipe).")] = None,
    scale: Annotated[float | None, typer.Option(help="Random zoom of training digits by 1 ± SCALE, e.g. 0.1 (default: from --recipe).")] = None,
    weight_decay: Annotated[float | None, typer.Option(help="AdamW decoupled weight decay (default: from --recipe).")] = None,
    seed: Annotated[int, typer.Option(help="Seed for initial weights, data order and augmentation.")] = 0,
    limit: LimitOpt = None,
    test_limit: Annotated[int | None, typer.Option(help="Score each epoch on the first N test images only (default: all).")] = None,
    out: Annotated[Path | None, typer.Option(help="Run folder for model.safetensors, metrics.jsonl, checkpoint (default: runs/HEAD).")] = None,
    resume: Annotated[Path | None, typer.Option(help="Continue the run in this folder from its last checkpoint.")] = None,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress bars.")] = False,
) -> None:
    """Train a capsule or pooling model on single digits.

    Writes RUN/model.safetensors (the model, readable by every backend), RUN/metrics.jsonl (one
    line per epoch) and RUN/checkpoint.safetensors (for --resume). Ctrl-C saves and exits; a second
    Ctrl-C aborts at once.

    Example: capsctl train --head capsule --data-dir ../shared/data/mnist-5k --out runs/caps
    """
    from capsctl.backend import get_backend
    from capsctl.cli._options import check_range
    from capsctl.data import datasets
    from capsctl.errors import CapsctlError
    from capsctl.training.recipes import get_recipe

    check_range("--test-limit", test_limit, 1)
    from capsctl.model.spec import ModelSpec
    from capsctl.training.config import TrainConfig
    from capsctl.training.loop import train as run_training

    if resume is not None:
        if out is not None and out != resume:
            raise CapsctlError("give either --out or --resume RUN, not both")
        from capsctl.training.run_folder import load_checkpoint

        ck = load_checkpoint(resume)
        be = get_backend(backend if backend != "torch" or ck.config.backend == "torch" else ck.config.backend)
        ds = datasets.load(ck.config.dataset, data_dir)
        run_training(be, ck.spec, ck.config, ds.train(), _test_split(ds, test_limit), resume, resume=True,
                     show_progress=not quiet)
        typer.echo(f"model: {resume / 'model.safetensors'}")
        return

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
        spec = ModelSpec(head=head) if head in ("capsule", "pool") else None  # type: ignore[assignment]
        if spec is None:
            raise CapsctlError(f"--head must be capsule or pool, got {head!r}")
    # checked here so the message names the option, not the spec field it sets
    from capsctl.cli._options import check_range
    from capsctl.model.spec import ROUTINGS, SQUASHES

    check_range("--routings (capsule.routings)", routings, 1, 100)
    for opt, given, choices in (("routing", routing, ROUTINGS), ("squash", squash, SQUASHES)):
        if given is not None and given not in choices:
            raise CapsctlError(f"--{opt} (capsule.{opt}) must be one of {', '.join(choices)}, got {given!r}")
    changes: dict[str, object] = {}
    for key, value in (("routing", routing), ("squash", squash), ("routings", routings)):
        if value is not None:
            changes[key] = value
    if not shared:
        changes["shared"] = False
    if changes:
        spec = spec.with_capsule(**changes)

    rec = get_recipe(recipe)
    settings = rec.settings(spec.head, epochs=epochs, batch_size=batch_size, lr=lr, schedule=schedule, shift=shift,
                            scale=scale, weight_decay=weight_decay)
    cfg = TrainConfig(backend=backend, dataset=dataset, seed=seed, limit=limit, recipe=recipe, **settings)
    be = get_backend(backend)
    ds = datasets.load(dataset, data_dir)
    train_split = ds.train()
    if spec.head == "capsule" and not spec.capsule.shared and spec.capsule.num_inputs is None:
        gh, gw = spec.trunk_grid(*train_split.images.shape[1:3])
        spec = spec.with_capsule(num_inputs=gh * gw)
    run = out if out is not None else Path("runs") / spec.head
    run_training(be, spec, cfg, train_split, _test_split(ds, test_limit), run, show_progress=not quiet)
    typer.echo(f"model: {run / 'model.safetensors'}")


def _test_split(ds, limit):
    from capsctl.data.datasets import Split

    test = ds.test()
    return test if limit is None else Split(test.images[:limit], test.labels[:limit])
