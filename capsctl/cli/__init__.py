"""The `capsctl` command line. Command modules import frameworks (and numpy) only when run,
so `capsctl --help` stays fast and framework-free."""

import sys
from typing import Annotated

import typer

try:  # Typer >= 0.26 vendors Click; older releases depend on it
    from typer._click import exceptions as click_exc
except ImportError:  # pragma: no cover
    import click.exceptions as click_exc  # type: ignore[no-redef]

from capsctl.cli import _bench, _data, _eval, _experiment, _export, _inspect, _predict, _train

_EXIT = tuple({typer.Exit, getattr(click_exc, "Exit", typer.Exit)})
_ABORT = tuple({typer.Abort, getattr(click_exc, "Abort", typer.Abort), KeyboardInterrupt})
DEBUG = "--debug"
ARGS: list[str] = []  # the arguments main() runs (`train --nproc N` starts each rank with them)

app = typer.Typer(
    name="capsctl",
    help="Train, compare, export and look inside capsule networks, on PyTorch or Keras 3.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    rich_markup_mode="markdown",  # docstring paragraphs are reflowed to the terminal width
    add_completion=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)
app.command("train")(_train.train)
app.command("eval")(_eval.eval_model)
app.command("eval-pairs")(_eval.eval_pairs)
app.command("export")(_export.export)
app.command("import")(_export.import_)
app.command("inspect")(_inspect.inspect)
app.command("predict")(_predict.predict)
app.command("bench")(_bench.bench)
app.add_typer(_experiment.app, name="experiment")
app.add_typer(_data.app, name="data")

# (backend, [(distribution, alternative distributions...)]): what `--version` reports for each backend
_FRAMEWORKS: dict[str, list[tuple[str, ...]]] = {
    "torch": [("torch",)],
    "keras": [("keras",), ("tensorflow", "tensorflow-cpu")],
}


def _version(value: bool) -> None:
    """Print capsctl's version and each backend's framework versions, read from the installed
    packages' metadata (no framework is imported)."""
    if not value:
        return
    from importlib.metadata import PackageNotFoundError, entry_points, version

    from capsctl import __version__

    def installed(names: tuple[str, ...]) -> str | None:
        for name in names:
            try:
                return f"{name} {version(name)}"
            except PackageNotFoundError:
                continue
        return None

    typer.echo(f"capsctl {__version__}")
    backends = dict.fromkeys([*_FRAMEWORKS, *(ep.name for ep in entry_points(group="capsctl.backends"))])
    for name in backends:
        found = [installed(dists) for dists in _FRAMEWORKS.get(name, [])]
        if found and all(found):
            typer.echo(f"{name} backend: {', '.join(f for f in found if f)}")
        elif found:
            typer.echo(f"{name} backend: not installed (pip install 'capsctl[{name}]')")
        else:
            typer.echo(f"{name} backend: registered (a plug-in)")
    raise typer.Exit()


@app.callback()
def _global_options(
    debug: Annotated[
        bool,
        typer.Option(
            DEBUG,
            help="On an error, show the full traceback instead of one line (may go anywhere on the line).",
        ),
    ] = False,
    version: Annotated[
        bool,
        typer.Option(
            "--version",
            callback=_version,
            is_eager=True,
            help="Print the versions of capsctl and of each backend's framework, and exit.",
        ),
    ] = False,
) -> None:
    # `main` has already read --debug (from anywhere on the command line); nothing else to do here
    pass


def _split_debug(args: list[str]) -> tuple[bool, list[str]]:
    """Take --debug from anywhere before a `--`; it is put back first, where the global option reads it."""
    end = args.index("--") if "--" in args else len(args)
    debug = DEBUG in args[:end]
    if not debug:
        return False, args
    return True, [DEBUG, *(a for a in args[:end] if a != DEBUG), *args[end:]]


def _say(line: str) -> None:
    """An error line on stderr; a rank of a `--nproc` job other than 0 leaves it to the launcher, which
    prints it unless rank 0 said the same (every rank failing alike is one line, not N)."""
    from capsctl.errors import leave_to_launcher

    if not leave_to_launcher(line):
        typer.echo(line, err=True)


def main(argv: list[str] | None = None) -> None:
    """Entry point: runs the app, turning every expected failure into one line and an exit code."""
    from capsctl._process_exit import end

    try:
        _main(argv)
    except SystemExit as e:  # (every way out of _main: a rank of a torch job ends without finalizing)
        end(e.code)


def _traceback(debug: bool) -> None:
    """With --debug, the traceback of the exception being handled, before its usual line: the exit code
    stays the one scripts check for (2 for bad input), not the interpreter's 1."""
    if debug:
        import traceback

        traceback.print_exc()


class _Terminated(KeyboardInterrupt):
    """SIGTERM, taken as Ctrl-C is: a half-written temporary file is removed, a training run saves its
    position (it died at once, leaving temporary files and an unfinished run folder)."""


_TERMINATED: list[int] = []


def _terminated(signum: int, frame: object) -> None:
    # (nothing imported here: a signal landing part way through an import would make that a traceback)
    _TERMINATED.append(signum)  # (Typer may turn the interrupt into a plain 130: this says which it was)
    raise _Terminated


def _main(argv: list[str] | None) -> None:
    debug, args = _split_debug(list(sys.argv[1:] if argv is None else argv))
    ARGS[:] = args
    import signal
    import threading

    from capsctl.training._launcher_env import launched

    _TERMINATED.clear()
    # not in a rank of a job (it ends as before on SIGTERM, and its launcher says what stopped the job),
    # nor where the caller chose otherwise (a test harness, an embedding program); put back at the end
    main_thread = threading.current_thread() is threading.main_thread()
    installed = main_thread and not launched() and signal.getsignal(signal.SIGTERM) == signal.SIG_DFL
    if installed:
        signal.signal(signal.SIGTERM, _terminated)
    try:
        _run(args, debug)
    finally:
        if installed:
            signal.signal(signal.SIGTERM, signal.SIG_DFL)


def _run(args: list[str], debug: bool) -> None:
    from capsctl.errors import CapsctlError, is_out_of_memory, os_error_exit

    try:
        rv = app(args=args, prog_name="capsctl", standalone_mode=False)
    except click_exc.NoArgsIsHelpError as e:
        typer.echo(e.ctx.get_help() if e.ctx else "", err=True)
        sys.exit(2)
    except click_exc.UsageError as e:
        cmd = e.ctx.command_path if e.ctx else "capsctl"
        message = e.format_message().replace("Value error, ", "")  # (Typer's wording of a bad choice)
        typer.echo(f"error: {message} (see `{cmd} --help`)", err=True)
        sys.exit(2)
    except _EXIT as e:
        sys.exit(e.exit_code)
    except _ABORT:
        typer.echo("terminated" if _TERMINATED else "aborted", err=True)
        sys.exit(143 if _TERMINATED else 130)
    except CapsctlError as e:
        _traceback(debug)
        _say(f"error: {e}")
        sys.exit(e.exit_code)
    except BrokenPipeError:
        sys.exit(1)
    except OSError as e:
        _traceback(debug)
        line, status = os_error_exit(e)
        _say(line)
        sys.exit(status)
    except Exception as e:  # (MemoryError and the frameworks' own out-of-memory errors; others go on up)
        if not is_out_of_memory(e):
            raise
        _traceback(debug)
        _say("error: out of memory (try a smaller --batch-size or --limit)")
        sys.exit(1)
    if rv == 130:  # Typer turns Ctrl-C outside training (scoring, a data set's decoding) into a silent 130
        from capsctl.training._launcher_env import launched

        if _TERMINATED:
            typer.echo("terminated", err=True)
            sys.exit(143)
        if not launched():  # (a rank of a job: its launcher says what stopped the job, once)
            typer.echo("aborted", err=True)
    sys.exit(rv if isinstance(rv, int) else 0)
