"""The `capsctl` command line. Command modules import frameworks (and numpy) only when run,
so `capsctl --help` stays fast and framework-free."""

from __future__ import annotations

import sys

import typer

try:  # Typer >= 0.26 vendors Click; older releases depend on it
    from typer._click import exceptions as click_exc
except ImportError:  # pragma: no cover
    import click.exceptions as click_exc  # type: ignore[no-redef]

from capsctl.cli import _data, _eval, _train

_EXIT = tuple({typer.Exit, getattr(click_exc, "Exit", typer.Exit)})
_ABORT = tuple({typer.Abort, getattr(click_exc, "Abort", typer.Abort), KeyboardInterrupt})

app = typer.Typer(
    name="capsctl",
    help="Train, compare, export and look inside capsule networks, on PyTorch or Keras 3.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)
app.command("train")(_train.train)
app.command("eval")(_eval.eval_model)
app.command("eval-pairs")(_eval.eval_pairs)
app.add_typer(_data.app, name="data")


def _register_optional() -> None:
    # Later-added commands live in their own modules; each is optional so a partial checkout runs.
    import importlib

    for module, name, attr, kind in (
        ("_export", "export", "export", "command"),
        ("_export", "import", "import_", "command"),
        ("_inspect", "inspect", "inspect", "command"),
        ("_bench", "bench", "bench", "command"),
        ("_experiment", "experiment", "app", "group"),
    ):
        try:
            mod = importlib.import_module(f"{__name__}.{module}")
        except ModuleNotFoundError as e:
            if e.name != f"{__name__}.{module}":
                raise
            continue
        if kind == "command":
            app.command(name)(getattr(mod, attr))
        else:
            app.add_typer(getattr(mod, attr), name=name)


_register_optional()


def main(argv: list[str] | None = None) -> None:
    """Entry point: runs the app, turning every expected failure into one line and an exit code."""
    args = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in args
    if debug:
        args.remove("--debug")
    from capsctl.errors import CapsctlError

    try:
        rv = app(args=args, prog_name="capsctl", standalone_mode=False)
    except click_exc.NoArgsIsHelpError as e:
        typer.echo(e.ctx.get_help() if e.ctx else "", err=True)
        sys.exit(2)
    except click_exc.UsageError as e:
        cmd = e.ctx.command_path if e.ctx else "capsctl"
        typer.echo(f"error: {e.format_message()} (see `{cmd} --help`)", err=True)
        sys.exit(2)
    except _EXIT as e:
        sys.exit(e.exit_code)
    except _ABORT:
        typer.echo("aborted", err=True)
        sys.exit(130)
    except CapsctlError as e:
        if debug:
            raise
        typer.echo(f"error: {e}", err=True)
        sys.exit(e.exit_code)
    except BrokenPipeError:
        sys.exit(1)
    except MemoryError:
        if debug:
            raise
        typer.echo("error: out of memory (try a smaller --batch-size or --limit)", err=True)
        sys.exit(1)
    except OSError as e:
        if debug:
            raise
        where = f"{e.filename}: " if getattr(e, "filename", None) else ""
        typer.echo(f"error: {where}{e.strerror or e}", err=True)
        sys.exit(2 if isinstance(e, (FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError)) else 1)
    sys.exit(rv if isinstance(rv, int) else 0)
