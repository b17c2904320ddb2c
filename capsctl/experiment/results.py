"""results.json of an experiment folder, with its Markdown table and plots beside it."""

from __future__ import annotations

import json
import shlex
from pathlib import Path
from typing import Any

from capsctl._io import atomic_write_bytes
from capsctl.errors import CapsctlError
from capsctl.experiment import plots as _plots
from capsctl.experiment import tables as _tables

RESULTS_FORMAT = "capsctl-results/1"


def write_results(out: Path, results: dict[str, Any]) -> None:
    """results.json, results.md and the PNG plots, each written atomically."""

    atomic_write_bytes(out / "results.json", (json.dumps(results, indent=1) + "\n").encode())
    if results["kind"] == "pairs":
        md = _tables.pairs_markdown(results)
        plots = _plots.pairs_plots(results, out)
    else:
        md = _tables.ablate_markdown(results)
        plots = _plots.ablate_plots(results, out)
    links = "".join(f"\n![{p.stem}]({p.name})\n" for p in plots)
    atomic_write_bytes(out / "results.md", (md + links).encode())


def command_with(command: str, **flags: str) -> str:
    """A recorded `experiment` command with options replaced (or added), e.g. seeds="0,1,2", and without
    --no-train (which only tabulates: the command recorded is the one that trains)."""
    words = [w for w in shlex.split(command) if w != "--no-train"]
    for name, value in flags.items():
        flag = "--" + name.replace("_", "-")
        if flag in words:
            words[words.index(flag) + 1] = value
        else:
            words += [flag, value]
    return shlex.join(words)


def load_results(folder: Path) -> dict[str, Any]:
    path = folder / "results.json"
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise CapsctlError(
            f"{path}: not found (run `capsctl experiment pairs/ablate --out {folder}` first)"
        ) from None
    except (OSError, ValueError) as e:  # (ValueError: bad JSON, or bytes that are not UTF-8)
        raise CapsctlError(f"{path}: unreadable ({e})") from None
    if not isinstance(data, dict) or data.get("format") != RESULTS_FORMAT:
        raise CapsctlError(f"{path}: not a capsctl results file")
    if data.get("kind") not in ("pairs", "ablate"):
        raise CapsctlError(f"{path}: damaged results file (its 'kind' is neither pairs nor ablate)")
    try:  # its tables read every field a report uses: a damaged one is named here, with its file
        _tables.pairs_markdown(data) if data["kind"] == "pairs" else _tables.ablate_markdown(data)
    except DAMAGE as e:
        raise CapsctlError(f"{path}: damaged results file ({type(e).__name__}: {e})") from None
    return data


# what reading a results.json whose fields are missing or of the wrong type raises
DAMAGE = (KeyError, TypeError, IndexError, AttributeError, ValueError)
