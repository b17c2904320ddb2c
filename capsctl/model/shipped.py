"""The capsule model that ships inside the package, so `capsctl inspect image.png` works right after install.

It was trained by the project's own default recipe on the embedded mnist-5k set (`tools/make_shipped_model.py`
regenerates it); its file carries its provenance (command, seed, commit, test and pairs numbers) in the
metadata entry "provenance", also written out in docs/SHIPPED-MODEL.md.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from capsctl.data.datasets import REINSTALL
from capsctl.errors import CapsctlError
from capsctl.model.weights import read_safetensors

SHIPPED_MODEL = Path(__file__).parent / "capsule-mnist5k.safetensors"
PROVENANCE_KEY = "provenance"
# every field the provenance must carry (tests check them; the tools script writes them)
PROVENANCE_FIELDS = (
    "command", "recipe", "seed", "commit", "dataset", "backend", "capsctl_version", "created",
    "test_accuracy", "test_images", "pairs", "check",
)


def shipped_model() -> Path:
    """The shipped model file; a one-line error naming the reinstall command if it is missing."""
    if not SHIPPED_MODEL.is_file():
        raise CapsctlError(f"the shipped model {SHIPPED_MODEL} is missing; reinstall: {REINSTALL}")
    return SHIPPED_MODEL


def provenance(path: Path | None = None) -> dict[str, Any]:
    """The provenance record stored in a model file's metadata (the shipped model's by default)."""
    path = shipped_model() if path is None else path
    _, meta = read_safetensors(path)
    try:
        record = json.loads(meta[PROVENANCE_KEY])
    except (KeyError, json.JSONDecodeError):
        raise CapsctlError(f"{path}: no provenance record in its metadata") from None
    if not isinstance(record, dict):
        raise CapsctlError(f"{path}: the provenance record is not a JSON object")
    return record
