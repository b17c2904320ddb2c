"""What the commands share: the Enums of every fixed choice and the Annotated option aliases, so a
concept has one name, one help text and one check on every command.

The Enums are built from the library's own tuples (capsctl.choices, the recipes),
so `--help` lists the choices, a bad value is Typer's usage error (exit 2), and the two cannot drift.
Nothing here imports numpy or a framework: `capsctl --help` builds every command's options."""

from collections.abc import Callable, Sequence
from enum import Enum
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, cast

import typer

from capsctl import choices
from capsctl.errors import CapsctlError
from capsctl.training.recipes import RECIPES, SCHEDULES


class Choice(str, Enum):
    """A str Enum whose members print as their value (in --help, messages and JSON)."""

    def __str__(self) -> str:
        return str(self.value)


def _choice(name: str, values: Sequence[str]) -> type[Choice]:
    make: Any = Choice  # Enum's functional API: a subclass of Choice with these members
    return cast("type[Choice]", make(name, [(v, v) for v in values]))


if TYPE_CHECKING:  # to the type checker a choice is a str (which a member is; str(member) is its value)
    Arch = str
    Head = str
    Routing = str
    Squash = str
    Recipe = str
    Schedule = str
    Dataset = str
    Layout = str
    Compose = str
    Order = str
    Invert = str
    Format = str
    Test = str
else:
    Arch = _choice("Arch", choices.ARCHS)
    Head = _choice("Head", choices.HEADS)
    Routing = _choice("Routing", choices.ROUTINGS)
    Squash = _choice("Squash", choices.SQUASHES)
    Recipe = _choice("Recipe", tuple(RECIPES))
    Schedule = _choice("Schedule", SCHEDULES)
    Dataset = _choice("Dataset", choices.DATASETS)
    Layout = _choice("Layout", choices.LAYOUTS)
    Compose = _choice("Compose", choices.COMPOSE)
    Order = _choice("Order", choices.DIRECTIONS)
    Invert = _choice("Invert", choices.INVERT_CHOICES)
    Format = _choice("Format", choices.EXPORT_FORMATS)
    Test = _choice("Test", choices.ALL_TESTS)


# -- several values: repeat the option or give a comma list ('--heads capsule,pool') ----------------------


def _metavar(values: Sequence[str]) -> str:
    return f"<{'|'.join(values)}>,..."


def names_callback(enum: type[Enum]) -> Callable[[list[str] | None], list[str] | None]:
    """Splits comma lists and checks every name against `enum`; returns the values, in order, once each."""
    known = [m.value for m in enum]

    def split(given: list[str] | None) -> list[str] | None:
        if given is None:
            return None
        names = [p.strip() for text in given for p in text.split(",") if p.strip()]
        if not names:
            raise typer.BadParameter("no values given")
        for n in names:
            if n not in known:
                raise typer.BadParameter(f"{n!r} is not one of {', '.join(map(repr, known))}")
        return list(dict.fromkeys(names))

    return split


def ints_callback(
    option: str, lo: int = 0, hi: int = 1 << 30
) -> Callable[[list[str] | None], list[int] | None]:
    def split(given: list[str] | None) -> list[int] | None:
        if given is None:
            return None
        try:
            return parse_ints(",".join(given), option, lo, hi)
        except CapsctlError as e:
            raise typer.BadParameter(str(e).removeprefix(f"{option}: ")) from None

    return split


MAX_INT_VALUES = 1000  # an --seeds or --routings list longer than this is a typo, not an experiment


def parse_ints(text: str, option: str, lo: int = 0, hi: int = 1 << 30) -> list[int]:
    """'0,1,2' -> [0, 1, 2]; also accepts ranges like '1-8'."""
    values: list[int] = []
    for part in (p.strip() for p in text.split(",")):
        if not part:
            continue
        try:
            a, b = part.split("-", 1) if "-" in part[1:] else (part, part)
            first, last = int(a), int(b)
        except ValueError:
            raise CapsctlError(f"{option}: expected comma-separated integers, got {text!r}") from None
        for v in (first, last):  # (checked before the range is expanded: 0-100000000 hung)
            if not lo <= v <= hi:
                raise CapsctlError(f"{option}: {v} is outside {lo}..{hi}")
        if last < first:
            raise CapsctlError(f"{option}: the range {part} runs backwards; write {last}-{first}")
        if len(values) + last - first + 1 > MAX_INT_VALUES:
            raise CapsctlError(f"{option}: more than {MAX_INT_VALUES} values (each one a model to train)")
        values.extend(range(first, last + 1))
    if not values:
        raise CapsctlError(f"{option}: no values given")
    return list(dict.fromkeys(values))


def names_option(
    enum: type[Enum], *decls: str, help: str, hidden: bool = False, panel: str | None = None
) -> Any:
    return typer.Option(
        *decls,
        callback=names_callback(enum),
        metavar=_metavar([m.value for m in enum]),
        help=f"{help} Repeat the option or give a comma list.",
        hidden=hidden,
        rich_help_panel=panel,
    )


def ints_option(
    *decls: str, help: str, lo: int = 0, hi: int = 1 << 30, hidden: bool = False, panel: str | None = None
) -> Any:
    return typer.Option(
        *decls,
        callback=ints_callback(decls[0], lo, hi),
        metavar="<int>,...",
        help=f"{help} Repeat the option or give a comma list; A-B is a range.",
        hidden=hidden,
        rich_help_panel=panel,
    )


# -- backends: a registry (the entry-point group `capsctl.backends`), checked when the command runs ------

BACKEND_METAVAR = f"<{'|'.join(choices.BUILTIN_BACKENDS)}>"


def _backend_names(given: Sequence[str]) -> list[str]:
    from capsctl.backend import available_names  # imports numpy: only when a command runs

    known = available_names()
    for name in given:
        if name not in known:
            raise typer.BadParameter(f"unknown backend {name!r} (known: {', '.join(known)})")
    return list(given)


def _check_backend(given: str | None) -> str | None:
    return None if given is None else _backend_names([given.strip()])[0]


def _check_backends(given: list[str] | None) -> list[str] | None:
    if given is None:
        return None
    names = [p.strip() for text in given for p in text.split(",") if p.strip()]
    if not names:
        raise typer.BadParameter("no values given")
    return list(dict.fromkeys(_backend_names(names)))


def backends_option(*decls: str, help: str, hidden: bool = False, panel: str | None = None) -> Any:
    return typer.Option(
        *decls,
        callback=_check_backends,
        metavar=f"{BACKEND_METAVAR},...",
        help=f"{help} Repeat the option or give a comma list.",
        hidden=hidden,
        rich_help_panel=panel,
    )


# -- one name, one help text per concept: a factory (for a command's help panel) and an alias each ---------

RUN, DATA, MODEL, RECIPE = "Run", "Data", "Model", "Recipe"  # help panels of the commands with many options


def backend_option(panel: str | None = None, show_default: bool | str = True) -> Any:
    return typer.Option(
        "--backend",
        "-b",
        callback=_check_backend,
        metavar=BACKEND_METAVAR,
        help="Framework that runs the model.",
        show_default=show_default,
        rich_help_panel=panel,
    )


def _check_dataset(given: str | None) -> str | None:
    """A registry name, or a path that exists (what it holds is checked when the data is read)."""
    if given is None or given in choices.DATASETS:
        return given
    if not Path(given).exists():
        raise typer.BadParameter(
            f"{given!r} is neither one of {', '.join(map(repr, choices.DATASETS))} nor an existing path"
        )
    return given


def dataset_option(panel: str | None = None) -> Any:
    return typer.Option(
        callback=_check_dataset,
        metavar=f"<{'|'.join(choices.DATASETS)}|PATH>",
        help="Data set (see `capsctl data list`): mnist-5k is embedded in capsctl (5,000 training digits "
        "and the 10,000 test digits, offline); mnist and fashion-mnist are the full sets, cifar10 is "
        "CIFAR-10 (32x32 colour, 10 classes; 162 MiB download). Or your own: "
        "a folder DIR/train/CLASS/*.png + DIR/test/CLASS/… (sorted by file name across classes, so "
        "CLASS/00042.png files keep an exported set's order; decoded once, then cached), an .npz (x_train, "
        "y_train, x_test, y_test), or a folder of the four IDX files.",
        rich_help_panel=panel,
    )


def image_size_option(panel: str | None = None) -> Any:
    return typer.Option(
        "--image-size",
        metavar="HxW",
        help="With --dataset PATH: scale every image to fit HxW pixels (aspect kept, padded with its "
        "background: white for dark ink on light, else black); needed when the images differ in size. "
        "(`predict`/`inspect --resize HxW --fit` read an image so.)",
        rich_help_panel=panel,
    )


def data_dir_option(panel: str | None = None) -> Any:
    return typer.Option(
        help="Folder holding the data set's own files: the four IDX files (cifar10: cifar-10-binary.tar.gz). "
        "Else: $CAPSCTL_DATA_DIR/NAME, the user cache, the system package, a download.",
        rich_help_panel=panel,
    )


def limit_option(panel: str | None = None) -> Any:
    return typer.Option("--limit", help="Train on the first N training images only.", rich_help_panel=panel)


def holdout_option(panel: str | None = None, scoring: bool = False) -> Any:
    """--holdout; `scoring`: for eval and eval-pairs, which score what a training run held out."""
    train = (
        "Hold out N training images (a fixed random draw) and score on them instead of the test set "
        "(choose a recipe here, never on the test set); a --dataset folder without test/ needs this or "
        "--val-fraction."
    )
    score = (
        "Score the N training images that `capsctl train --holdout N` held out (the same N and data, the "
        "same fixed draw) instead of the test set; refused for a model trained on all of them."
    )
    return typer.Option("--holdout", help=score if scoring else train, rich_help_panel=panel)


def val_fraction_option(panel: str | None = None) -> Any:
    return typer.Option(
        "--val-fraction",
        metavar="F",
        help="As --holdout, with a fraction 0 < F < 1 of the training images.",
        rich_help_panel=panel,
    )


def eval_limit_option(what: str = "test images", panel: str | None = None) -> Any:
    return typer.Option("--eval-limit", help=f"Score only the first N {what}.", rich_help_panel=panel)


def json_option(panel: str | None = None) -> Any:
    return typer.Option("--json", help="Print one JSON object instead of a table.", rich_help_panel=panel)


def quiet_option(panel: str | None = None) -> Any:
    return typer.Option("--quiet", "-q", help="No progress bars.", rich_help_panel=panel)


BackendOpt = Annotated[str, backend_option()]
DatasetOpt = Annotated[str, dataset_option()]
ImageSizeOpt = Annotated[str | None, image_size_option()]
DataDirOpt = Annotated[Path | None, data_dir_option()]
ModelArg = Annotated[
    Path,
    typer.Argument(metavar="MODEL", help="A capsctl model file (.safetensors), e.g. RUN/model.safetensors."),
]
# MODEL on the commands that fall back to the shipped model (`shipped_model_said`) when it is left out
OptionalModelArg = Annotated[
    Path | None,
    typer.Argument(
        metavar="MODEL",
        help="A capsctl model file (.safetensors); left out: the model that ships with capsctl.",
        show_default=False,
    ),
]
JsonOpt = Annotated[bool, json_option()]
LimitOpt = Annotated[int | None, limit_option()]
EvalLimitOpt = Annotated[int | None, eval_limit_option()]
BatchSizeOpt = Annotated[int, typer.Option("--batch-size", help="Images per forward pass.")]
QuietOpt = Annotated[bool, quiet_option()]
FitOpt = Annotated[
    bool,
    typer.Option(
        "--fit",
        help="With --resize: scale to fit inside HxW with the aspect kept and pad with the image's "
        "background, as `train --image-size` read the training folder (else it is stretched to HxW).",
    ),
]


def old_name(*decls: str) -> Any:
    """The old spelling of a renamed option: still accepted, no longer shown in --help."""
    return typer.Option(*decls, hidden=True)


def renamed(new: str, new_value: Any, old: str, old_value: Any, default: Any = None) -> Any:
    """The value of an option that also answers to its old name `old`; both given, differently, is refused."""
    if old_value is None:
        return new_value
    if new_value != default and new_value != old_value:
        raise CapsctlError(f"{old} is the old name of {new}; give one of them")
    return old_value


def check_range(
    name: str, value: float | int | None, lo: float | None = None, hi: float | None = None
) -> None:
    if value is None:
        return
    if value != value:  # NaN: every comparison below is false, so it passed (`--threshold nan`)
        raise CapsctlError(f"{name} must be a number, got nan")
    if (lo is not None and value < lo) or (hi is not None and value > hi):
        bounds = f"{lo if lo is not None else '-inf'}..{hi if hi is not None else 'inf'}"
        raise CapsctlError(f"{name} must be in {bounds}, got {value}")


def shipped_model_said() -> Path:
    """The model that ships with capsctl, for a command given no MODEL; says so in one line on stderr."""
    from capsctl._console import err
    from capsctl.model.shipped import shipped_model

    path = shipped_model()
    err.print(
        f"no model given: using the shipped model {path.name} (trained on mnist-5k; docs/SHIPPED-MODEL.md)",
        soft_wrap=True,
    )
    return path


def data_args(
    dataset: str,
    data_dir: Path | str | None,
    image_size: str | None = None,
    holdout: int | None = None,
    val_fraction: float | None = None,
) -> str:
    """The data options of a suggested command (" --dataset D --data-dir X ..."), so that it scores the
    same images: the default data set and options left out are not repeated."""
    import shlex

    args = f" --data-dir {shlex.quote(str(data_dir))}" if data_dir is not None else ""
    if dataset != "mnist-5k":
        args += f" --dataset {shlex.quote(dataset)}"
    if image_size is not None:
        args += f" --image-size {image_size}"
    if holdout is not None:  # scored on the same held-out images
        args += f" --holdout {holdout}"
    elif val_fraction is not None:
        args += f" --val-fraction {val_fraction:g}"
    return args


def given(ctx: typer.Context, *names: str) -> bool:
    """Whether the user gave any of these options (not left them at their defaults), even with the
    default's value."""
    sources = (ctx.get_parameter_source(n) for n in names)
    return any(s is not None and s.name in ("COMMANDLINE", "ENVIRONMENT", "PROMPT") for s in sources)
