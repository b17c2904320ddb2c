"""Keras-native files: a `.keras` archive of the registered `capsctl>CapsNet` model.

The archive's config is just the ModelSpec (CapsNet.get_config), so loading it rebuilds the
graph from the project's own layer classes with `safe_mode=True` (nothing is deserialised as
code); its weights are the Keras variables, already channels-last.
"""

from __future__ import annotations

import json
import os
import tempfile
import warnings
import zipfile
import zlib
from collections.abc import Mapping
from pathlib import Path

import numpy as np

from capsctl.errors import CapsctlError, reraise_interrupt
from capsctl.model.spec import ModelSpec
from capsctl.model.weights import MODEL_FORMAT, check_weights, other_format

from ._env import keras
from ._layers import PACKAGE, CapsNet
from ._runner import build
from ._weights import read

REGISTERED = f"{PACKAGE}>{CapsNet.__name__}"


def export_bytes(spec: ModelSpec, weights: Mapping[str, np.ndarray], format: str) -> bytes:
    """`capsctl export --format keras`: the `.keras` archive's bytes."""
    model = build(spec, weights)
    # Keras writes the archive only to a path ending in .keras: a private temporary one
    with tempfile.TemporaryDirectory(prefix="capsctl-export-") as tmp:
        tmp_file = os.path.join(tmp, "model.keras")
        model.save(tmp_file)
        return Path(tmp_file).read_bytes()


def _check_archive(path: str) -> ModelSpec:
    """Read the archive's config.json without Keras: refuse anything that is not our model."""
    try:
        with zipfile.ZipFile(path) as zf:
            names = set(zf.namelist())
            if "config.json" not in names or "model.weights.h5" not in names:
                raise CapsctlError(
                    f"{path}: not a Keras model archive (no config.json / model.weights.h5 inside)"
                )
            config = json.loads(zf.read("config.json"))
    except FileNotFoundError:
        raise CapsctlError(f"{path}: no such file") from None
    except (zipfile.BadZipFile, EOFError, zlib.error):
        raise CapsctlError(f"{path}: not a .keras archive, or a truncated one (bad zip structure)") from None
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError):
        raise CapsctlError(f"{path}: the archive's config.json is not valid JSON") from None
    except zipfile.LargeZipFile as e:
        raise CapsctlError(f"{path}: {e}") from None
    kind = config.get("registered_name") or config.get("class_name") if isinstance(config, dict) else None
    if kind != REGISTERED:
        raise CapsctlError(
            f"{path}: not a capsctl Keras model (its model class is {kind!r}, expected {REGISTERED!r}); "
            "only files written by `capsctl export --format keras` can be imported"
        )
    inner = config.get("config")
    # (a file written before the key was added has none: the contract it follows is this one)
    fmt = inner.get("format", MODEL_FORMAT) if isinstance(inner, dict) else MODEL_FORMAT
    if fmt != MODEL_FORMAT:
        raise CapsctlError(f"{path}: {other_format(str(fmt))}")
    spec_dict = inner.get("spec") if isinstance(inner, dict) else None
    try:
        return ModelSpec.from_dict(spec_dict)
    except CapsctlError as e:
        raise CapsctlError(f"{path}: {e}") from None


def _one_line(text: str, limit: int = 300) -> str:
    line = " ".join(part.strip() for part in text.strip().splitlines() if part.strip())
    return line if len(line) <= limit else line[: limit - 1] + "…"


def import_native(path: str) -> tuple[ModelSpec, dict[str, np.ndarray]]:
    spec = _check_archive(path)
    try:
        with warnings.catch_warnings(record=True) as caught, tempfile.TemporaryDirectory() as tmp:
            warnings.simplefilter("always")
            source = path
            if not str(path).endswith(".keras"):  # Keras picks its reader by suffix alone
                source = os.path.join(tmp, "model.keras")
                os.symlink(os.path.abspath(path), source)
            model = keras.saving.load_model(source, compile=False, safe_mode=True)
    except CapsctlError as e:
        raise CapsctlError(f"{path}: {e}") from None
    except Exception as e:  # Keras reports bad archives with many types (ValueError, KeyError, OSError...)
        reraise_interrupt(e)
        text = _one_line(str(e)) or type(e).__name__
        if "could not be loaded" in text:  # a variable and its saved value differ in shape
            raise CapsctlError(
                f"{path}: the archive's weights do not fit the spec in its config ({text})"
            ) from None
        raise CapsctlError(f"{path}: cannot load the Keras model ({text})") from None
    # Keras only warns when part of the saved state finds no variable ("retain their freshly
    # initialized weights"); for an import that would be silent corruption, so it is an error.
    for w in caught:
        text = str(w.message)
        if "could not be loaded" in text or "retain" in text or "Skipping" in text:
            raise CapsctlError(f"{path}: the archive's weights do not match its model ({_one_line(text)})")
    if not isinstance(model, CapsNet):
        raise CapsctlError(f"{path}: loaded a {type(model).__name__}, not a capsctl CapsNet")
    weights = read(spec, model)
    check_weights(spec, weights, path)
    return spec, weights
