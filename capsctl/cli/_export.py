"""`capsctl export` and `capsctl import`: the canonical model file <-> framework-native files."""

from pathlib import Path
from typing import Annotated

import typer

from capsctl.cli._options import Format, ModelArg

# which backend writes each format
_EXPORTED_BY = {"torch": "torch", "keras": "keras", "onnx": "torch"}
_SUFFIXES = {".pt": "torch", ".pth": "torch", ".keras": "keras", ".onnx": "onnx"}


def _format_for(out: Path, given: Format | None) -> str:
    from capsctl.choices import EXPORT_FORMATS
    from capsctl.errors import CapsctlError

    guess = _SUFFIXES.get(out.suffix.lower())
    if given is not None:
        if guess is not None and guess != str(given):  # e.g. an ONNX file named .pt: refused, not written
            want = next(s for s, f in _SUFFIXES.items() if f == str(given))
            raise CapsctlError(
                f"--out {out}: a {out.suffix} file is a {guess} export, not {given}; call it {out.stem}{want}"
            )
        return str(given)
    if guess is None:
        choices = "|".join(EXPORT_FORMATS)
        raise CapsctlError(f"--out {out}: cannot tell the format from the suffix; pass --format {choices}")
    return guess


def _check_out(out: Path, source: Path) -> None:
    from capsctl._io import resolved
    from capsctl.errors import CapsctlError

    if resolved(out, "--out") == resolved(source, "the input"):
        raise CapsctlError(f"--out {out}: is the input file; choose another path")
    if out.is_dir():
        raise CapsctlError(f"--out {out}: is a folder, expected a file path")
    if not out.parent.is_dir():
        raise CapsctlError(f"--out {out}: folder {out.parent} does not exist")


def export(
    model: ModelArg,
    out: Annotated[Path, typer.Option(help="File to write (.pt/.pth, .keras or .onnx).")],
    format: Annotated[
        Format | None,
        typer.Option(
            "--format",
            "-f",
            help="torch (state_dict), keras (.keras) or onnx.",
            show_default="from --out's suffix",
        ),
    ] = None,
) -> None:
    """Write a model in a framework's own format.

    torch: a state_dict for torch.load(path, weights_only=True), carrying its spec;
    capsctl_torch.load_model(path) rebuilds the network from it (images (B, C, H, W) -> scores).

    keras: a .keras archive for capsctl_keras.load_model(path) (keras safe_mode).

    onnx: routing unrolled; input images (B, H, W, C), output scores (B, J); any batch, and any image
    size unless the capsule weights are per-position. A model with a decoder has a second output,
    reconstruction (B, H', W', C), drawn from the top-scoring class's capsule at the decoder's own
    image size (its training images'), whatever the input's size.

    Example: capsctl export runs/capsule/model.safetensors --out caps.pt
    (caps.keras needs the keras extra, caps.onnx the onnx one)
    """
    from capsctl._io import atomic_write_bytes
    from capsctl.backend import get_backend
    from capsctl.errors import CapsctlError
    from capsctl.model.weights import load_model

    _check_out(out, model)
    if out.suffix.lower() == ".safetensors":  # (a torch zip or an ONNX graph under the canonical name)
        raise CapsctlError(
            f"--out {out}: a .safetensors file is the canonical model (capsctl import writes it); export "
            "writes .pt, .keras or .onnx"
        )
    fmt = _format_for(out, format)
    if fmt == "keras" and out.suffix != ".keras":  # (keras.saving.load_model reads no other, not even .KERAS)
        raise CapsctlError(f"--out {out}: a Keras model file must end in .keras (lower case)")
    spec, weights = load_model(model)
    backend = get_backend(_EXPORTED_BY[fmt])
    atomic_write_bytes(out, backend.export_bytes(spec, weights, fmt))
    typer.echo(f"wrote {out} ({fmt}, {spec.head} head)")


class _Unrecognised(Exception):
    """A file _sniff cannot tell apart (not a zip, a zip of other files): with --format given, the
    backend's reader says what is wrong; the other refusals stand whatever --format says."""


def _sniff(path: Path) -> str:
    """'torch', 'keras', or a CapsctlError saying what the file is instead (_Unrecognised: not known)."""
    import zipfile

    from capsctl._io import read_user_file
    from capsctl.errors import CapsctlError

    head = read_user_file(path, "a torch or Keras export", limit=16)
    if path.suffix.lower() == ".onnx":
        raise CapsctlError(
            f"{path}: ONNX graphs cannot be imported (export to ONNX is one-way); "
            "import the torch or Keras export"
        )
    if len(head) >= 9 and head[8:9] == b"{":
        raise CapsctlError(
            f"{path}: is a .safetensors file, already the canonical format (nothing to import)"
        )
    if head[:1] == b"\x80":  # a legacy (non-zip) torch.save pickle stream
        return "torch"
    if head[:2] != b"PK":
        raise _Unrecognised(f"{path}: not a torch state_dict file or a .keras archive")
    try:
        with zipfile.ZipFile(path) as zf:
            names = zf.namelist()
    except (zipfile.BadZipFile, EOFError):
        raise CapsctlError(f"{path}: damaged or truncated archive (no readable zip directory)") from None
    if "config.json" in names and "model.weights.h5" in names:
        return "keras"
    if any(n.endswith("/data.pkl") for n in names):
        return "torch"
    raise _Unrecognised(f"{path}: a zip archive, but neither a torch state_dict file nor a .keras archive")


def import_(
    path: Annotated[
        Path, typer.Argument(metavar="PATH", help="A file written by `capsctl export --format torch|keras`.")
    ],
    out: Annotated[Path, typer.Option(help="The canonical model file to write (.safetensors).")],
    format: Annotated[
        Format | None,
        typer.Option(
            "--format",
            "-f",
            help="torch or keras (onnx graphs cannot be imported).",
            show_default="detected from the file",
        ),
    ] = None,
) -> None:
    """Turn a native torch or Keras export back into the canonical .safetensors model file.

    The tensors come back bit for bit. A damaged file, a file that is not a capsctl export, or
    tensors that do not match the spec it carries are refused (exit 2).

    Example: capsctl import caps.pt --out caps.safetensors
    """
    from capsctl.backend import get_backend
    from capsctl.errors import CapsctlError
    from capsctl.model.weights import save_model

    if format is not None and format == "onnx":
        raise CapsctlError(
            "--format onnx: ONNX graphs cannot be imported (export to ONNX is one-way); "
            "import the torch or Keras export"
        )
    _check_out(out, path)
    from capsctl.training.run_folder import CHECKPOINT_FILE

    if out.name == CHECKPOINT_FILE:  # (a model file there: the run could no longer be resumed)
        raise CapsctlError(
            f"--out {out}: is a run's checkpoint (train --resume reads it); write the model under another "
            "name"
        )
    if out.suffix.lower() in _SUFFIXES:  # (export's own suffixes: the file would be taken for one)
        raise CapsctlError(
            f"--out {out}: import writes the canonical model file, not a {_SUFFIXES[out.suffix.lower()]} "
            f"export; call it {out.stem}.safetensors"
        )
    try:
        sniffed: str | None = _sniff(path)
    except _Unrecognised as e:
        if format is None:
            raise CapsctlError(str(e)) from None
        sniffed = None  # (the user says what it is: the backend's reader tells)
    if format is not None and sniffed is not None and str(format) != sniffed:
        raise CapsctlError(
            f"{path}: a {sniffed} export, not {format}; leave out --format (it is detected from the file)"
        )
    fmt = str(format) if format is not None else str(sniffed)
    spec, weights = get_backend(fmt).import_native(str(path))
    save_model(out, spec, weights)
    typer.echo(f"wrote {out} (from {fmt}, {spec.head} head)")
