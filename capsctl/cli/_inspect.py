"""`capsctl inspect`: look at the routing of one image."""

from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from capsctl._console import shown
from capsctl.cli._options import BackendOpt, FitOpt, Invert, JsonOpt, Order, given, shipped_model_said

if TYPE_CHECKING:
    from capsctl.inspect.analysis import Inspection
    from capsctl.model.spec import ModelSpec


def inspect(
    ctx: typer.Context,
    model: Annotated[
        Path,
        typer.Argument(
            metavar="MODEL",
            help="A capsctl model file (.safetensors), e.g. RUN/model.safetensors; or, as the only argument, "
            "the IMAGE (the model that ships with capsctl is then used).",
            show_default=False,
        ),
    ],
    image: Annotated[
        Path | None,
        typer.Argument(
            metavar="IMAGE",
            help="PNG, JPEG, BMP (GIF, TIFF, WebP, PPM) or a .npy array; any size.",
            show_default=False,
        ),
    ] = None,
    model_opt: Annotated[
        Path | None, typer.Option("--model", "-m", hidden=True)
    ] = None,  # old: IMAGE -m MODEL
    backend: BackendOpt = "torch",
    invert: Annotated[
        Invert,
        typer.Option(
            help="auto (a gray model: bring a gray image to the background it trained on, white ink on "
            "black for MNIST; a colour model's images: never), yes or no."
        ),
    ] = "auto",
    resize: Annotated[
        str | None, typer.Option(help="Resize to HxW pixels first, e.g. 28x28.", show_default="keep its size")
    ] = None,
    fit: FitOpt = False,
    top: Annotated[
        int | None, typer.Option(help="Also list the top K classes, and read the order of those K.")
    ] = None,
    routings: Annotated[
        int | None, typer.Option(help="Routing iterations at inference (1–100).", show_default="the model's")
    ] = None,
    order: Annotated[Order, typer.Option(help="Reading order of the classes found.")] = "auto",
    out: Annotated[
        Path | None, typer.Option(help="Save a figure of the maps here (.png, .svg or .pdf).")
    ] = None,
    json_out: JsonOpt = False,
    reconstruct: Annotated[
        bool,
        typer.Option(
            "--reconstruct",
            help="Redraw the input from each predicted capsule (the 5 highest-scoring at most) with the "
            "model's decoder; --out draws the input, each reconstruction and their overlay in colours.",
        ),
    ] = False,
    perturb: Annotated[
        bool,
        typer.Option(
            "--perturb",
            help="Redraw one capsule (--class) with each dimension moved from -RANGE to +RANGE; --out "
            "draws the dimensions × steps grid.",
        ),
    ] = False,
    cls: Annotated[
        int | None,
        typer.Option(
            "--class",
            help="The capsule --reconstruct/--perturb uses.",
            show_default="--reconstruct: the predicted ones; --perturb: the highest-scoring",
        ),
    ] = None,
    value_range: Annotated[
        float, typer.Option("--range", help="--perturb: the largest offset added to a dimension.")
    ] = 0.25,
    steps: Annotated[int, typer.Option(help="--perturb: offsets from -RANGE to +RANGE.")] = 11,
) -> None:
    """Show how a capsule model routes one image: lengths, routing, maps.

    The table lists every class's capsule length, the predicted classes
    (length > 0.5; with --top K also the K longest) and, per routing
    iteration, the mean |Δc| of the coupling coefficients and their mean
    entropy over the classes (ln J is uniform: 2.30 for 10 classes; 0 is one-hot).

    Reading order: each selected class (predicted, or the top K) is placed
    at the centre of mass of its last-iteration evidence max(c·û·v, 0) over
    the trunk's grid; classes are read top to bottom in an image taller than
    wide, else left to right (--order to choose).

    Input: white digits on black as in MNIST; a light background is
    inverted for a gray model (--invert auto; --invert no for photos; a
    model trained on dark ink on light gets its images the other way). Colour becomes gray
    for a gray model; a colour model sees RGB, which --out draws in colour.
    8- and 16-bit images are read; a transparent image is put on the
    background that contrasts with its ink; a photo is turned upright by
    its EXIF orientation. Classes are shown by the model's
    class names (--json: class_names, predicted_names, top_names,
    order_names beside the indices). A .npy file holds one image: (H, W), channels-last (H, W, C)
    with C = 1, 3 or 4, or (1, H, W); floats in 0..1 (a little past it, clipped) or 0..255. A stack of
    images is refused. Shared capsule weights take any image size, but
    digits should be about MNIST-sized (20 px tall): --resize a big image.
    Per-position capsule weights need the training size (--resize).
    --resize stretches; with --fit the image keeps its aspect and is padded
    with its background, as `train --image-size` read a folder.

    Pooling-head models have no routing: inspect shows their class scores
    and predictions only (--out draws the image and the scores;
    --routings is refused).

    With IMAGE alone, the model that ships with capsctl is used (a capsule
    model trained on the embedded mnist-5k digits; docs/SHIPPED-MODEL.md).

    Example: capsctl inspect runs/capsule/model.safetensors
    docs/inspect-example-input.png --top 2 --out maps.png

    Models trained with a decoder (capsctl train --decoder) can redraw the
    input: --reconstruct reconstructs from each predicted capsule (5 at most, or
    --class C) alone, every other capsule zeroed, at the training image size;
    on a larger input (a composite) each reconstruction is placed centred on
    its class's evidence and overlaid in its own colour. --perturb redraws
    capsule --class (default the highest-scoring) with each of its D
    dimensions moved in --steps from -RANGE to +RANGE. --json adds the
    reconstructions as nested lists [row][col][channel].

    Example: capsctl train --decoder --out runs/dec, then capsctl inspect
    runs/dec/model.safetensors docs/inspect-example-input.png --reconstruct --out recon.png

    Example: capsctl inspect docs/digit-4.png   (the shipped model)
    """
    model, image = _model_and_image(ctx, model, image, model_opt)
    import json

    import numpy as np

    from capsctl._console import err
    from capsctl.backend import get_backend
    from capsctl.cli._options import check_range
    from capsctl.data.images import load_image, parse_size
    from capsctl.errors import CapsctlError
    from capsctl.inspect.analysis import inspect_one
    from capsctl.model.spec import names_of
    from capsctl.model.weights import load_model

    check_range("--routings", routings, 1, 100)
    if reconstruct and perturb:
        raise CapsctlError("give --reconstruct or --perturb, not both")
    if not perturb and given(ctx, "value_range", "steps"):
        raise CapsctlError("--range and --steps go with --perturb")
    if cls is not None and not (reconstruct or perturb):
        raise CapsctlError("--class goes with --reconstruct or --perturb")
    if out is not None:
        from capsctl.inspect.figure import check_out_path

        check_out_path(out, Path(image))
    size = parse_size(resize) if resize is not None else None
    if fit and size is None:
        raise CapsctlError("--fit scales to fit the --resize size: give --resize HxW too")
    spec, weights = load_model(model)
    names = names_of(spec)  # the spec's class names, else "0".."J-1"
    check_range("--top", top, 1, spec.num_classes)
    if reconstruct or perturb:
        from capsctl.inspect import reconstruction

        reconstruction.check_decoder(spec, model, "--reconstruct" if reconstruct else "--perturb")
        if perturb:
            reconstruction.check_perturb(spec, cls, value_range, steps)
        elif cls is not None:
            check_range("--class", cls, 0, spec.num_classes - 1)
    if spec.in_channels not in (1, 3):
        raise CapsctlError(
            f"{model}: the model takes {spec.in_channels}-channel images; inspect reads gray (1) or RGB (3)"
        )
    if spec.head == "pool" and routings is not None:
        raise CapsctlError(f"--routings: {model} has a pooling head, which has no routing")
    if spec.head == "capsule" and spec.capsule.routing == "attention" and routings is not None:
        raise CapsctlError(f"--routings: {model} routes by attention, in one pass (it has no iterations)")
    # a colour model sees RGB (H, W, 3): the analysis and the maps' outlines use its mean over the
    # channels, the figures' input panels the colour image itself
    rgb = load_image(image, invert=str(invert), resize=size, spec=spec, channels=spec.in_channels, fit=fit)
    img = rgb if rgb.ndim == 2 else rgb.mean(axis=2)
    from capsctl.model.fit import check_takes

    check_takes(spec, img.shape[0], img.shape[1], str(image), str(model))
    runner = get_backend(backend).runner(spec, weights)
    x = img[None, :, :, None] if rgb.ndim == 2 else rgb[None]
    if spec.head == "capsule":
        scores, trace = runner.trace(x, routings)
        res = inspect_one(
            spec, scores[0], img.shape, trace.couplings[0], trace.agreement[0], top=top, direction=str(order)
        )
    else:
        res = inspect_one(spec, runner.scores(x)[0], img.shape, top=top, direction=str(order))

    extra: dict[str, object] = {}
    if reconstruct:
        from capsctl.inspect import reconstruction

        chosen = reconstruction.reconstruct_classes(res, cls)
        if cls is None and len(res.selected) > len(chosen):  # (the rest were left out without a word)
            err.print(
                f"{len(res.selected)} classes selected; reconstructing the {len(chosen)} highest-scoring "
                "(--class C for another)",
                highlight=False, soft_wrap=True,
            )
        recons = runner.reconstruct(np.repeat(x, len(chosen), axis=0), np.asarray(chosen))
        by_class = {j: recons[i] for i, j in enumerate(chosen)}
        extra["reconstructions"] = {str(j): np.asarray(r, np.float64).tolist() for j, r in by_class.items()}
        if out is not None:
            title = (
                f"{shown(image.name)} — {shown(str(model))}: reconstructions from capsules "
                f"{', '.join(names[j] for j in chosen)}"
            )
            reconstruction.save_reconstruct_figure(
                out, rgb, by_class, res, title, names, light=spec.background == "light"
            )
            err.print(f"figure: {shown(str(out))}", markup=False)
            out = None
        else:
            err.print(
                f"reconstructed from capsules: {', '.join(names[j] for j in chosen)} (--out draws them)",
                markup=False,
            )
    elif perturb:
        from capsctl.inspect import reconstruction

        chosen_cls = cls if cls is not None else int(np.argmax(res.scores))
        grid = reconstruction.perturbations(runner, x, chosen_cls, value_range, steps)
        extra["perturbation"] = {
            "class": chosen_cls,
            "class_name": names[chosen_cls],
            "offsets": [float(o) for o in np.linspace(-value_range, value_range, steps)],
            "reconstructions": np.asarray(grid, np.float64).tolist(),  # [dimension][step][row][col][channel]
        }
        if out is not None:
            title = (
                f"{shown(image.name)} — {shown(str(model))}: capsule {names[chosen_cls]}, each dimension "
                f"±{value_range:g}"
            )
            reconstruction.save_perturb_figure(out, grid, chosen_cls, value_range, title, names[chosen_cls])
            err.print(f"figure: {shown(str(out))}", markup=False)
            out = None
        else:
            dims = grid.shape[0]
            err.print(
                f"perturbed capsule {names[chosen_cls]}: {dims} dimensions × {steps} steps "
                "(--out draws them)",
                markup=False,
            )

    if out is not None:
        from capsctl.inspect.figure import save_figure

        save_figure(out, rgb, res, spec, _title(image, model, spec, res, backend))
        err.print(f"figure: {shown(str(out))}", markup=False)
    if json_out:
        d: dict[str, object] = {
            "image": str(image),
            "model": str(model),
            "backend": backend,
            "head": spec.head,
        }
        if spec.head == "capsule":
            d["routing"] = spec.capsule.routing
        d.update(res.to_json(names))
        d.update(extra)
        typer.echo(json.dumps(d))
        return
    _print_tables(image, spec, res, backend)


def _model_and_image(
    ctx: typer.Context, first: Path, second: Path | None, model_opt: Path | None
) -> tuple[Path, Path]:
    """MODEL IMAGE, the older IMAGE -m MODEL, or IMAGE alone (the shipped model)."""
    if model_opt is None:
        if second is None:
            if first.suffix.lower() == ".safetensors":  # a model file alone: the image was forgotten
                raise typer.BadParameter(
                    "give the image after the model: capsctl inspect MODEL IMAGE (or IMAGE alone, for the "
                    "shipped model)",
                    ctx=ctx,
                    param_hint="'IMAGE'",
                )
            return shipped_model_said(), first
        return first, second
    if second is not None:
        raise typer.BadParameter(
            "give MODEL IMAGE, or the older IMAGE -m MODEL, not both", ctx=ctx, param_hint="'-m' / '--model'"
        )
    return model_opt, first


def _title(image: Path, model: Path, spec: "ModelSpec", res: "Inspection", backend: str) -> str:
    if spec.head != "capsule":
        return f"{shown(image.name)} — {shown(str(model))} (pooling head, no routing; {backend})"
    caps = spec.capsule
    gh, gw = res.grid or (0, 0)
    types = caps.primary.types if caps.primary is not None else 1  # (capsule types at each place)
    grid = f"{gh}×{gw}" if types == 1 else f"{gh}×{gw}×{types}"
    return (
        f"{shown(image.name)} — {shown(str(model))}: routing '{caps.routing}', {res.routings} iterations, "
        f"{grid} = {gh * gw * types} input capsules ({backend})"
    )


def _fmt(x: float | None, digits: int = 4) -> str:
    if x is None:
        return "—"
    return f"{x:.{digits}f}" if x == 0 or abs(x) >= 10 ** -(digits - 1) else f"{x:.1e}"


def _print_tables(image: Path, spec: "ModelSpec", res: "Inspection", backend: str) -> None:
    import math

    from rich.markup import escape
    from rich.table import Table
    from rich.text import Text

    from capsctl._console import out
    from capsctl.model.spec import names_of

    names = names_of(spec)  # the spec's class names, else "0".."J-1"
    h, w = res.image_shape
    capsule = res.couplings is not None
    what = "length" if capsule else "score"
    where = f", grid {res.grid[0]}×{res.grid[1]}" if res.grid else ""
    # the heading is printed on its own (not as the table's title) so a long path is not squeezed into
    # the table's width; Text, not markup, so brackets in a file name print as they are
    heading = f"{shown(str(image))} — {h}×{w}{where} ({spec.head} head, {backend})"
    out.print(Text(heading, style="bold"), soft_wrap=True)
    table = Table()
    if capsule:
        table.caption = "length = ‖v_j‖; centre = where the class's evidence c·û·v sits in the image (pixels)"
        table.caption_justify = "left"
    table.add_column("class", justify="right")
    table.add_column(what, justify="right")
    table.add_column("", justify="left", no_wrap=True)  # a bar of the length
    table.add_column("predicted", justify="center")
    if res.top:
        table.add_column(f"top {len(res.top)}", justify="center")
    if capsule:
        table.add_column("centre (row, col)", justify="right", no_wrap=True)
        table.add_column("order", justify="center")
    order = {j: i + 1 for i, j in enumerate(res.order or [])}
    for j, s in enumerate(res.scores):
        predicted = j in res.predicted
        cells = [escape(names[j]), f"{s:.4f}", _bar(float(s)), "[bold green]yes[/]" if predicted else ""]
        if res.top:
            cells.append(f"#{res.top.index(j) + 1}" if j in res.top else "")
        if capsule:
            centre = res.centres[j] if res.centres is not None and j in res.selected else None
            cells.append(
                "" if centre is None or math.isnan(centre[0]) else f"{centre[0]:5.1f}, {centre[1]:5.1f}"
            )
            cells.append(str(order[j]) if j in order else "")
        table.add_row(*cells, style="bold" if predicted else None)
    out.print(table)
    if capsule:
        it = Table(
            title=f"routing '{spec.capsule.routing}', {res.routings} iterations — convergence",
            title_justify="left",
        )
        it.add_column("iteration", justify="right")
        it.add_column("mean |Δc|", justify="right")
        it.add_column("mean entropy of c", justify="right")
        uniform = math.log(len(res.scores))
        it.caption = f"entropy over classes in nats: {uniform:.2f} = uniform, 0 = one class per input"
        it.caption_justify = "left"
        for r, (dlt, ent) in enumerate(zip(res.deltas, res.entropy, strict=True), start=1):
            it.add_row(str(r), _fmt(dlt), _fmt(ent, 3))
        out.print(it)
    found = ", ".join(names[j] for j in res.predicted) or "none above 0.5"
    line = f"predicted: {found}"
    if res.top:
        line += f"; top {len(res.top)}: {', '.join(names[j] for j in res.top)}"
    if res.order:
        line += f"; reading order ({res.direction}): {' → '.join(names[j] for j in res.order)}"
    elif not capsule:
        line += " (pooling head: no routing to show)"
    out.print(line, soft_wrap=True, markup=False)  # one line for grep; the terminal wraps it


def _bar(x: float, width: int = 10) -> str:
    n = max(0, min(width, round(x * width)))
    return "█" * n + "·" * (width - n)
