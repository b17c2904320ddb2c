"""`capsctl train`."""

from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

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
    backend_option,
    data_dir_option,
    dataset_option,
    eval_limit_option,
    given,
    holdout_option,
    image_size_option,
    limit_option,
    old_name,
    quiet_option,
    val_fraction_option,
)
from capsctl.training.config import RANGE_TEXT

if TYPE_CHECKING:
    from capsctl.backend import Backend
    from capsctl.model.spec import ModelSpec
    from capsctl.training.config import TrainConfig
    from capsctl.training.distributed import World

# Options that shape a run. `--resume RUN` takes them from the run's checkpoint; giving one is refused
# rather than ignored. (--backend, --data-dir and --eval-limit may be given: they replace the run's.)
_FIXED_ON_RESUME = (
    "arch",
    "image_size",
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
    "curve_images",
    "decoder",
    "recon_weight",
    "holdout",
    "val_fraction",
    "compose",
)
_RECIPE_DEFAULT = "from --recipe"


def train(
    ctx: typer.Context,
    arch: Annotated[
        Arch | None,
        typer.Option(
            help="Architecture: seed (the seed article's trunk and shared-weight capsule layer), "
            "sabour2017 (Sabour et al. 2017: Conv256 9x9, 32x8 primary capsules, non-shared DigitCaps, "
            "decoder; 8.2M parameters), efficient (Efficient-CapsNet: batch-normed convs, depthwise "
            "primary capsules, self-attention routing; 162k) or efficient-multimnist (its authors' graph "
            "for 36x36 pairs: use with --compose overlap; 155k). All but seed take their training image "
            "size only. A --spec file's fields replace the preset's. docs/ARCHITECTURES.md",
            show_default="seed",
            rich_help_panel=MODEL,
        ),
    ] = None,
    head: Annotated[
        Head,
        typer.Option(
            help="capsule (dynamic routing) or pool (global average pooling).", rich_help_panel=MODEL
        ),
    ] = "capsule",
    routing: Annotated[
        Routing | None,
        typer.Option(
            help="Routing: su (replace logits), sabour (accumulate), su-unit, or attention "
            "(Efficient-CapsNet's single pass; needs non-shared weights).",
            show_default="the --arch preset's; seed: su",
            rich_help_panel=MODEL,
        ),
    ] = None,
    squash: Annotated[
        Squash | None,
        typer.Option(
            help="Squash: su s|s|/(0.5+|s|²), sabour s|s|/(1+|s|²) or efficient (1−e^−|s|)·s/|s|.",
            show_default="the --arch preset's; seed: su",
            rich_help_panel=MODEL,
        ),
    ] = None,
    routings: Annotated[
        int | None,
        typer.Option(
            help="Routing iterations (1–100).",
            show_default="the --arch preset's; seed: 3",
            rich_help_panel=MODEL,
        ),
    ] = None,
    shared: Annotated[
        bool | None,
        typer.Option(
            "--shared/--no-shared",
            help="One capsule weight for all positions (any image size), or one per input capsule (the "
            "training image size only).",
            show_default="the --arch preset's; seed: shared",
            rich_help_panel=MODEL,
        ),
    ] = None,
    decoder: Annotated[
        bool | None,
        typer.Option(
            "--decoder/--no-decoder",
            help="Add (remove) the reconstruction decoder: Dense 512-1024 ReLU, Dense H·W·C sigmoid on the "
            "masked capsules (capsule head only).",
            show_default="as --spec or the --arch preset: sabour2017 has one, the others none",
            rich_help_panel=MODEL,
        ),
    ] = None,
    recon_weight: Annotated[
        float | None,
        typer.Option(
            help="Weight of the decoder's reconstruction loss Σ(pixel error)² "
            f"({RANGE_TEXT['recon_weight']}).",
            show_default="0.0005·784/(H·W·C)",
            rich_help_panel=RECIPE,
        ),
    ] = None,
    spec_file: Annotated[
        Path | None,
        typer.Option(
            "--spec",
            help="A ModelSpec JSON file: replaces --head (and, with --arch, the preset's fields it sets); "
            "--routing, --squash, --routings, --shared/--no-shared and --decoder/--no-decoder still apply "
            "on top of it.",
            rich_help_panel=MODEL,
        ),
    ] = None,
    dataset: Annotated[str, dataset_option(DATA)] = "mnist-5k",
    image_size: Annotated[str | None, image_size_option(DATA)] = None,
    data_dir: Annotated[Path | None, data_dir_option(DATA)] = None,
    limit: Annotated[int | None, limit_option(DATA)] = None,
    eval_limit: Annotated[int | None, eval_limit_option("test images after each epoch", DATA)] = None,
    test_limit: Annotated[int | None, old_name("--test-limit")] = None,
    holdout: Annotated[int | None, holdout_option(DATA)] = None,
    val_fraction: Annotated[float | None, val_fraction_option(DATA)] = None,
    curve_images: Annotated[
        int,
        typer.Option(
            help="Score the epochs before the last on the first N test images only (0: all of them, as "
            "the last epoch always is).",
            rich_help_panel=DATA,
        ),
    ] = 1000,
    recipe: Annotated[
        Recipe,
        typer.Option(
            help="default (measured best: batch 32, 15 epochs, ±5 px), default-2026-11 (the default until "
            "2026-11-29: batch 128, 30 epochs) or seed (the seed article's protocol).",
            rich_help_panel=RECIPE,
        ),
    ] = "default",
    epochs: Annotated[
        int | None,
        typer.Option(
            help=f"Passes over the training set ({RANGE_TEXT['epochs']}).",
            show_default=_RECIPE_DEFAULT,
            rich_help_panel=RECIPE,
        ),
    ] = None,
    batch_size: Annotated[
        int | None,
        typer.Option(
            help=f"Images per step ({RANGE_TEXT['batch_size']}).",
            show_default=_RECIPE_DEFAULT,
            rich_help_panel=RECIPE,
        ),
    ] = None,
    lr: Annotated[
        float | None,
        typer.Option(
            help=f"(Peak) learning rate ({RANGE_TEXT['lr']}).",
            show_default=_RECIPE_DEFAULT,
            rich_help_panel=RECIPE,
        ),
    ] = None,
    schedule: Annotated[
        Schedule | None,
        typer.Option(help="Learning-rate schedule.", show_default=_RECIPE_DEFAULT, rich_help_panel=RECIPE),
    ] = None,
    shift: Annotated[
        int | None,
        typer.Option(
            help=f"Random ±pixels translation of training digits ({RANGE_TEXT['shift']}).",
            show_default=_RECIPE_DEFAULT,
            rich_help_panel=RECIPE,
        ),
    ] = None,
    scale: Annotated[
        float | None,
        typer.Option(
            help=f"Random zoom of training digits by 1 ± SCALE, e.g. 0.1 ({RANGE_TEXT['scale']}).",
            show_default=_RECIPE_DEFAULT,
            rich_help_panel=RECIPE,
        ),
    ] = None,
    compose: Annotated[
        Compose | None,
        typer.Option(
            help="Train on composites instead of single digits. overlap (MultiMNIST, Sabour et al. 2017): "
            "every epoch pairs each training digit with a random one of another class, shifts both by up "
            "to ±4 px in a (H+8)x(W+8) canvas and merges them by pixel-wise maximum; the target is both "
            "labels, and the epochs are scored on overlap pairs of test digits (as eval-pairs --layout "
            "overlap). Replaces --shift/--scale. With --decoder, each digit is redrawn from its own capsule "
            "against that digit alone on the canvas.",
            show_default="single digits",
            rich_help_panel=RECIPE,
        ),
    ] = None,
    weight_decay: Annotated[
        float | None,
        typer.Option(
            help=f"AdamW decoupled weight decay ({RANGE_TEXT['weight_decay']}).",
            show_default=_RECIPE_DEFAULT,
            rich_help_panel=RECIPE,
        ),
    ] = None,
    seed: Annotated[
        int,
        typer.Option(help="Seed for initial weights, data order and augmentation.", rich_help_panel=RECIPE),
    ] = 0,
    backend: Annotated[
        str | None, backend_option(RUN, show_default="torch; with --resume, the run's")
    ] = None,
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
    json_out: Annotated[
        bool,
        typer.Option(
            "--json",
            help="Print the last epoch's metrics and the files written as one JSON object.",
            rich_help_panel=RUN,
        ),
    ] = False,
    nproc: Annotated[
        int | None,
        typer.Option(
            help="Train on N processes on this machine (data-parallel: torchrun's launcher for torch, "
            "tf.distribute workers with local TF_CONFIGs for keras; --batch-size stays the global batch). "
            "On several machines: docs/DISTRIBUTED.md.",
            rich_help_panel=RUN,
        ),
    ] = None,
    port: Annotated[
        int | None,
        typer.Option(
            help="Rendezvous port for --nproc (keras: worker i listens on PORT+i); the ranks connect over "
            "127.0.0.1, but the servers listen on every interface (docs/DISTRIBUTED.md).",
            show_default="a free one",
            rich_help_panel=RUN,
        ),
    ] = None,
) -> None:
    """Train a capsule or pooling model on single digits (--compose overlap: on pairs of overlapping digits).

    Writes RUN/model.safetensors (the model, readable by every backend), RUN/metrics.jsonl (one
    line per epoch) and RUN/checkpoint.safetensors. Ctrl-C saves and exits; a second Ctrl-C aborts
    at once. --resume RUN continues a stopped run exactly, with the settings it was started with
    (--backend torch|keras, --data-dir and --eval-limit may be given to replace the run's).
    --json prints the last epoch's metrics and the file paths as one object.

    Example: capsctl train --head capsule --out runs/caps   (the embedded mnist-5k digits)

    Example: capsctl train --arch sabour2017 --compose overlap --epochs 150 --out runs/mm
    """
    from capsctl import choices
    from capsctl.cli._options import check_range, renamed
    from capsctl.errors import CapsctlError

    _check_launch(nproc, port)
    if nproc is not None and spec_file is not None and not spec_file.is_file():
        # (each rank reads the command line's --spec again: a pipe is empty by then, `<(...)` closed)
        raise CapsctlError(
            f"--spec {spec_file}: not a regular file, and each rank of --nproc reads it again; save the "
            "spec to a file"
        )
    eval_limit = renamed("--eval-limit", eval_limit, "--test-limit", test_limit)
    check_range("--eval-limit", eval_limit, 1)
    check_range("--curve-images", curve_images, 0)
    folder = str(data_dir.absolute()) if data_dir is not None else None
    if resume is not None:
        if out is not None and out != resume:
            raise CapsctlError("give either --out or --resume RUN, not both")
        from capsctl.training import distributed
        from capsctl.training.run_folder import load_checkpoint

        # a rank after 0 of a job: the run folder is rank 0's (on its machine: the others have none)
        follower = nproc is None and distributed.launched_rank(backend) not in (None, 0)
        ck = None if follower else load_checkpoint(resume)  # (no run there: said first)
        fixed_given = [name for name in _FIXED_ON_RESUME if given(ctx, name)]
        if fixed_given:
            flags = ", ".join(_flag(ctx, name) for name in fixed_given)
            raise CapsctlError(
                f"--resume {resume}: continues with the settings the run was started with; leave out {flags}"
            )
        if ck is None:
            _follow_rank_0(resume, backend, folder, data_dir, quiet=quiet, json_out=json_out)
            return
        launcher = distributed.launcher_backend()
        if nproc is None and launcher is not None and launcher != (backend or ck.config.backend):
            # (it would train alone while the job's other ranks waited for it until their timeout)
            raise CapsctlError(
                f"--resume {resume}: a {ck.config.backend} run, but this process is a rank of a "
                f"{launcher} job ({'torchrun' if launcher == 'torch' else 'TF_CONFIG'}); give --backend "
                f"{launcher} to go on with {launcher}, or start it the {ck.config.backend} way"
            )
        from dataclasses import replace

        old = ck.config
        cfg = replace(
            old,
            backend=backend or old.backend,
            data_dir=folder or old.data_dir,
            eval_limit=eval_limit if eval_limit is not None else old.eval_limit,
        )
        _run(
            cfg,
            ck.spec,
            resume,
            data_dir or cfg.data_dir,
            resume=True,
            quiet=quiet,
            json_out=json_out,
            nproc=nproc,
            port=port,
        )
        return

    from capsctl.data.sources import parse_image_size

    parse_image_size(image_size)  # a bad --image-size is refused before anything runs
    spec, fixed = _spec(spec_file, head, routing, squash, routings, shared, _str(arch), given(ctx, "head"))
    if decoder is not None and (decoder != (spec.decoder is not None)):
        from capsctl.model.spec import DecoderSpec

        if decoder and spec.head != "capsule":
            raise CapsctlError(f"--decoder needs the capsule head (the model's head is {spec.head})")
        spec = spec.replace(decoder=DecoderSpec() if decoder else None)
    if recon_weight is not None and spec.decoder is None:
        raise CapsctlError("--recon-weight needs a model with a decoder (--decoder)")
    from capsctl.training.config import TrainConfig
    from capsctl.training.recipes import get_recipe

    settings = get_recipe(str(recipe)).settings(
        spec.head,
        epochs=epochs,
        batch_size=batch_size,
        lr=lr,
        schedule=_str(schedule),
        # composites shift their digits themselves: no --shift/--scale on top unless given (then refused)
        shift=0 if compose is not None and shift is None else shift,
        scale=0.0 if compose is not None and scale is None else scale,
        weight_decay=weight_decay,
    )
    cfg = TrainConfig(
        backend=backend or "torch",
        # a path to the user's data is recorded absolute, so --resume works from any folder
        dataset=str(dataset) if dataset in choices.DATASETS else str(Path(dataset).absolute()),
        image_size=image_size,
        seed=seed,
        limit=limit,
        recipe=str(recipe),
        data_dir=folder,
        eval_limit=eval_limit,
        curve_images=curve_images or None,
        holdout=holdout,
        val_fraction=val_fraction,
        compose=_str(compose),
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
        fixed=fixed,
        nproc=nproc,
        port=port,
    )


def _check_launch(nproc: int | None, port: int | None) -> None:
    """--nproc and --port are refused before anything runs; a rank started by torchrun takes neither."""
    from capsctl.errors import CapsctlError
    from capsctl.training import distributed

    if nproc is None:
        if port is not None:
            raise CapsctlError("--port needs --nproc N")
        return
    if distributed.launched():
        raise CapsctlError(
            "--nproc: this process is already a rank of a job (torchrun's variables or TF_CONFIG are set); "
            "leave --nproc out"
        )
    distributed.check_nproc(nproc)
    if port is not None:
        distributed.check_port(port)


def _launch(be: "Backend", nproc: int, port: int | None, run: Path, resume: bool) -> None:
    """`--nproc N`: this process starts N ranks running this same command line, and waits."""
    from capsctl.cli import ARGS
    from capsctl.errors import TrainingStopped
    from capsctl.training import distributed
    from capsctl.training.loop import refuse_existing

    if not resume:
        refuse_existing(run)  # said once here, not by every rank
    import os
    import tempfile

    from capsctl.errors import RANK_ERRORS_ENV

    # the ranks leave their error lines here: every rank failing alike is told once (rank 0's line)
    with tempfile.TemporaryDirectory(prefix="capsctl-ranks-") as told:
        os.environ[RANK_ERRORS_ENV] = told
        try:
            failed = be.distributed().launch(nproc, distributed.worker_argv(ARGS), port)
        except TrainingStopped as e:  # Ctrl-C: "stopped by SIGINT; every rank was stopped", then what next
            raise TrainingStopped(f"{e}; {distributed.then_line(_again(run, nproc))}", e.exit_code) from None
        finally:
            del os.environ[RANK_ERRORS_ENV]
            for line in distributed.told_errors(told, nproc):
                typer.echo(line, err=True)
    code, message = distributed.job_outcome(failed, _again(run, nproc))
    if message is not None:
        raise TrainingStopped(message, exit_code=code)
    if code:  # a rank said why (`error: ...`): its status is the job's
        raise typer.Exit(code)


def _again(run: Path, nproc: int) -> str | None:
    """The command that continues a stopped job of `nproc` ranks, or None before its first checkpoint."""
    from capsctl.training.run_folder import CHECKPOINT_FILE

    return f"capsctl train --resume {run} --nproc {nproc}" if (run / CHECKPOINT_FILE).exists() else None


def _str(choice: str | None) -> str | None:
    return None if choice is None else str(choice)  # a plain str for an Enum member


def _flag(ctx: typer.Context, name: str) -> str:
    """The option as the user wrote it: `--no-decoder` for a flag pair given its off side."""
    param = next(p for p in ctx.command.params if p.name == name)
    off = getattr(param, "secondary_opts", None) if ctx.params.get(name) is False else None
    return max(off or param.opts, key=len)


def _spec(
    spec_file: Path | None,
    head: str,
    routing: Routing | None,
    squash: Squash | None,
    routings: int | None,
    shared: bool | None,
    arch: str | None = None,
    head_given: bool = False,
) -> tuple["ModelSpec", frozenset[str]]:
    """The spec to train, and the top-level fields a --spec file sets (those stay as given, the data fills
    in the others). The file is read once: a pipe (`--spec /dev/stdin`) has nothing left to read again."""
    from capsctl.cli._options import check_range
    from capsctl.errors import CapsctlError
    from capsctl.model.spec import ModelSpec

    fields: frozenset[str] = frozenset()
    if arch is not None and arch != "seed" and head != "capsule":
        raise CapsctlError(f"--arch {arch} has a capsule head; --head {head} goes with --arch seed")
    if arch is not None and spec_file is None:
        from capsctl.model.presets import preset

        spec = preset(arch)
        spec = spec if head == "capsule" else spec.replace(head=str(head))
    elif spec_file is not None:
        try:
            import json

            from capsctl.model.spec import unique_keys

            text = spec_file.read_text(encoding="utf-8")
            try:
                from_file = json.loads(text, object_pairs_hook=unique_keys)
            except (ValueError, RecursionError):  # (ModelSpec.from_json says what is wrong with it)
                from_file = None
            if isinstance(from_file, dict):
                fields = frozenset(from_file)
            if arch is not None and isinstance(from_file, dict):  # its top-level fields replace the preset's
                from capsctl.model.presets import preset

                text = json.dumps({**preset(arch).to_dict(), **from_file})
            spec = ModelSpec.from_json(text)
        except OSError as e:
            raise CapsctlError(f"--spec {spec_file}: cannot read ({e.strerror})") from None
        except UnicodeDecodeError:
            raise CapsctlError(f"--spec {spec_file}: not a text file (expected ModelSpec JSON)") from None
        except CapsctlError as e:
            raise CapsctlError(f"--spec {spec_file}: {e}") from None
        if head_given and spec.head != head:  # (--head was ignored: the file's head, or capsule, was used)
            if "head" in fields:
                raise CapsctlError(f"--head {head}, but the --spec file says head {spec.head!r}: give one")
            spec = spec.replace(head=str(head))
        caps_given = from_file.get("capsule") if isinstance(from_file, dict) else None
        iterations, attention = spec.capsule.routings, (routing or spec.capsule.routing) == "attention"
        set_in_file = isinstance(caps_given, dict) and "routings" in caps_given
        if spec.head == "capsule" and set_in_file and attention and iterations != 1:
            # (recorded and without effect, as --routings with attention is refused)
            raise CapsctlError(
                f"--spec {spec_file}: capsule.routings {iterations} with attention routing, which runs in "
                "one pass; set it to 1 or leave it out"
            )
    else:
        spec = ModelSpec(head=str(head))
    # checked here so the message names the option, not the spec field it sets
    check_range("--routings (capsule.routings)", routings, 1, 100)
    if spec.head == "pool":  # (they were taken and ignored: the run looked like a routing experiment)
        given = [f"--{k}" for k, v in (("routing", routing), ("squash", squash), ("routings", routings)) if v]
        given += ["--shared" if shared else "--no-shared"] if shared is not None else []
        if given:
            raise CapsctlError(
                f"{', '.join(given)}: the pooling head has no capsule layer; these go with --head capsule"
            )
    changes: dict[str, object] = {}
    for key, value in (("routing", routing), ("squash", squash), ("routings", routings)):
        if value is not None:
            changes[key] = value if isinstance(value, int) else str(value)
    if shared is not None and shared != spec.capsule.shared:
        changes["shared"] = shared
        if shared:  # (the input count and size of per-position weights mean nothing to shared ones)
            changes.update(num_inputs=None, image_size=None)
    final = {k: changes.get(k, getattr(spec.capsule, k)) for k in ("shared", "num_inputs")}
    if spec.head == "capsule" and final["shared"] and final["num_inputs"] is not None:
        # (a file's: recorded and unused by shared weights; a model file saying so still opens)
        raise CapsctlError(
            "--spec: capsule.num_inputs is for per-position weights (shared false); leave it out"
        )
    if not changes:
        return spec, fields
    if routings is not None and spec.head == "capsule" and (routing or spec.capsule.routing) == "attention":
        # (recorded and without effect, as `inspect --routings` on such a model is refused)
        raise CapsctlError("--routings: attention routing runs in one pass; it has no iterations to set")
    try:
        return spec.with_capsule(**changes), fields
    except CapsctlError as e:  # named by the options given, not only by the spec fields they set
        options = {k: v for k, v in changes.items() if k not in ("num_inputs", "image_size")}  # (the given)
        flags = ", ".join("--no-shared" if k == "shared" and not v else f"--{k}" for k, v in options.items())
        where = f" with --arch {arch}" if arch is not None else ""
        raise CapsctlError(f"{flags}{where}: {e}") from None


def _run(
    cfg: "TrainConfig",
    spec: "ModelSpec",
    run: Path,
    data_dir: Path | str | None,  # as given (messages name it so); cfg records it as an absolute path
    *,
    resume: bool,
    quiet: bool,
    json_out: bool,
    fixed: frozenset[str] = frozenset(),  # spec fields the user set (--spec): not taken from the data
    nproc: int | None = None,  # start this many ranks (`--nproc`) instead of training here
    port: int | None = None,
) -> None:
    from capsctl.backend import get_backend

    be = get_backend(cfg.backend)
    if nproc is not None:
        _launch(be, nproc, port, run, resume)
        return
    from capsctl.training import distributed

    # a rank of a torchrun / tf.distribute job (or of --nproc) joins it before loading data (and before
    # TensorFlow runs anything: its strategy must be made first); rank 0 alone writes `run`
    world = be.distributed().join() if distributed.launched(cfg.backend) else None
    try:
        if world is not None and resume:  # the other ranks take the run's settings from rank 0
            distributed.share_settings(world, (cfg, spec))
        _run_rank(
            cfg, spec, run, data_dir, be, world, resume=resume, quiet=quiet, json_out=json_out, fixed=fixed
        )
    finally:
        if world is not None:
            world.close()


def _follow_rank_0(
    resume: Path,
    backend: str | None,
    folder: str | None,  # this rank's --data-dir, absolute
    data_dir: Path | None,
    *,
    quiet: bool,
    json_out: bool,
) -> None:
    """`train --resume RUN` as a rank > 0 of a job: join it, take the run's settings and spec from rank 0
    (which reads RUN), and train; this process never opens RUN. Its own --data-dir, if given, replaces the
    folder rank 0 recorded (each machine's copy of the data; the ranks check they hold the same)."""
    from dataclasses import replace

    from capsctl.backend import get_backend
    from capsctl.training import distributed

    be = get_backend(backend or distributed.launcher_backend() or "torch")  # (launched: one names it)
    world = be.distributed().join()
    try:
        cfg, spec = distributed.share_settings(world, None)
        cfg = replace(cfg, backend=be.name, data_dir=folder or cfg.data_dir)
        _run_rank(
            cfg,
            spec,
            resume,
            data_dir or cfg.data_dir,
            be,
            world,
            resume=True,
            quiet=quiet,
            json_out=json_out,
            fixed=frozenset(),
        )
    finally:
        world.close()


def _next_command(spec: "ModelSpec", compose: str | None) -> str:
    """What to try next with a trained model: its pair tests where it can take them (a larger image:
    shared capsule weights or the pool head; the overlap composites it trained on), else `eval`."""
    if compose == "overlap":
        return "eval-pairs --layout overlap"
    fixed_size = spec.head == "capsule" and not spec.capsule.shared
    return "eval" if fixed_size or spec.num_classes < 2 else "eval-pairs"


def _run_rank(
    cfg: "TrainConfig",
    spec: "ModelSpec",
    run: Path,
    data_dir: Path | str | None,
    be: "Backend",
    world: "World | None",
    *,
    resume: bool,
    quiet: bool,
    json_out: bool,
    fixed: frozenset[str],
) -> None:
    import json
    import shlex

    from capsctl.data import datasets
    from capsctl.training.loop import train as run_training
    from capsctl.training.run_folder import CHECKPOINT_FILE, METRICS_FILE, MODEL_FILE

    if world is not None:
        from capsctl.training.distributed import prefix_stderr

        prefix_stderr(world.rank)
        quiet = quiet or world.rank != 0  # one progress bar: rank 0's
    from capsctl._console import set_quiet
    from capsctl.data.sources import parse_image_size, splits

    set_quiet(quiet)  # (the data loaders' own bars too)

    ds = datasets.load(cfg.dataset, data_dir, parse_image_size(cfg.image_size))
    # (a folder without test/ and neither option is refused here, naming both)
    train_split, test_split = splits(ds, cfg.holdout, cfg.val_fraction)
    if not resume:  # the model follows the data: its channels, classes and their names
        classes = tuple(ds.classes)
        channels = int(train_split.images.shape[3])
        from capsctl.data.images import data_background

        follow: dict[str, Any] = {
            "in_channels": channels,
            "num_classes": len(classes),
            "background": data_background(train_split.images),
        }
        if "background" in fixed and spec.background != follow["background"]:
            # (a spec printed from a model of dark ink on light, reused on MNIST: every shift filled with
            # white, every predicted image inverted)
            from capsctl.errors import CapsctlError

            seen = "dark ink on light" if follow["background"] == "light" else "not dark ink on light"
            raise CapsctlError(
                f"--spec: background {spec.background!r}, but the training images are {seen}; leave the "
                "field out (it follows the data)"
            )
        from capsctl.model.spec import numbered

        unnamed = classes == numbered(len(classes))  # (IDX, npz: labels, no names)
        named = spec.class_names
        if "class_names" in fixed and named is not None and not unnamed and named != classes:
            # (the model learnt label j = the data's j-th class and called it the spec's j-th name; eval,
            # which matches classes by name, then scored against swapped labels or refused the data)
            from capsctl.errors import CapsctlError

            raise CapsctlError(
                f"--spec: class_names {list(named)}, but the training data's classes are "
                f"{list(classes)} (in label order); leave the field out (it follows the data)"
            )
        follow = {k: v for k, v in follow.items() if k not in fixed}
        if "class_names" not in fixed and follow.get("num_classes", spec.num_classes) == len(classes):
            follow["class_names"] = None if unnamed else classes
        if any(getattr(spec, k) != v for k, v in follow.items()):
            spec = spec.replace(**follow)
    size = tuple(int(n) for n in train_split.images.shape[1:3])
    if cfg.compose is not None:  # the model takes composites of the training images
        from capsctl.training.compose import canvas

        size = canvas(*size)
    from capsctl.model.fit import with_training_inputs

    spec = with_training_inputs(spec, size[0], size[1], cfg.compose is not None)
    if spec.decoder is not None and spec.decoder.image_shape is None:  # the decoder redraws training images
        from dataclasses import replace

        # (with --compose: each digit alone, on the composites' canvas)
        shape = (size[0], size[1], int(train_split.images.shape[3]))
        spec = spec.replace(decoder=replace(spec.decoder, image_shape=shape))
    if spec.decoder is not None and cfg.recon_weight is None:  # recorded in the run's checkpoint
        from dataclasses import replace

        from capsctl.model.spec import default_recon_weight

        cfg = replace(cfg, recon_weight=default_recon_weight(spec))
    rows = run_training(
        be, spec, cfg, train_split, test_split, run, resume=resume, show_progress=not quiet, world=world
    )
    if world is not None and world.rank != 0:
        return  # rank 0 reports the job
    if not json_out:
        model = run / MODEL_FILE
        typer.echo(f"model: {model}")
        # the run's last line says what to try next with it
        from capsctl.cli._options import data_args

        data = data_args(cfg.dataset, data_dir, cfg.image_size, cfg.holdout, cfg.val_fraction)
        typer.echo(f"next: capsctl {_next_command(spec, cfg.compose)} {shlex.quote(str(model))}{data}")
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
        "compose": cfg.compose,
        **last,
    }
    typer.echo(json.dumps(result))
