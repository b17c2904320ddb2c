"""One results.json from several `experiment pairs` folders that ran the same experiment on other seeds
(one machine or process each, or a seed added in a later session whose first runs are gone): the
models' records are taken as they were scored, and the means over seeds are computed again."""

from __future__ import annotations

import json
import os
import shlex
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from capsctl.errors import CapsctlError
from capsctl.experiment.results import load_results, write_results
from capsctl.experiment.scoring import summarize

# what may differ between the merged folders: the seeds and their models, and where and when they ran;
# every other field of results.json says what the experiment was and must be the same in each
PER_FOLDER = frozenset(
    {
        "command",
        "seeds",
        "models",
        "missing",
        "summary",
        "backend_info",
        "compute_seconds",
        "wall_seconds",
        "machine",
        "created",
        "merged_from",
    }
)


# what results.json files written before a field existed meant by its absence (or null)
ABSENT_MEANT = {"arch": "seed", "decoder": False}


def _get(results: dict[str, Any], key: str) -> Any:
    value = results.get(key)
    return ABSENT_MEANT.get(key) if value is None else value


def merge_results(folders: Sequence[Path], out: Path) -> dict[str, Any]:
    """Write OUT/results.json (with its table and plots) holding every seed of `folders`; returns it."""
    if len(folders) < 2:
        raise CapsctlError("give at least two result folders to merge")
    out_real = os.path.realpath(out)
    if any(os.path.realpath(f) == out_real for f in folders):
        raise CapsctlError(f"--out {out}: is one of the folders merged; give a new folder")
    _check_out(out)
    loaded = [(f, load_results(f)) for f in folders]
    first_folder, first = loaded[0]
    for folder, r in loaded:
        if r["kind"] != "pairs":
            raise CapsctlError(f"{folder}: holds an ablation; merge takes the results of `experiment pairs`")
        keys = (set(first) | set(r)) - PER_FOLDER
        differ = sorted(k for k in keys if _get(first, k) != _get(r, k))
        if differ:
            key = differ[0]
            raise CapsctlError(
                f"{folder}: not the same experiment as {first_folder} ({key}: {_get(r, key)!r} against "
                f"{_get(first, key)!r}); only the seeds may differ"
            )
    seeds: list[int] = []
    for folder, r in loaded:
        again = sorted(set(r["seeds"]) & set(seeds))
        if again:
            raise CapsctlError(f"{folder}: seed {again[0]} is in another folder too; merge each seed once")
        seeds += r["seeds"]
    heads = first["heads"]
    models = [
        {**m, "run": os.path.relpath(folder / m["run"], out)}
        for folder, r in loaded
        for m in r["models"]
    ]
    models.sort(key=lambda m: (m["seed"], heads.index(m["head"])))  # (as one run of all the seeds lists them)
    missing = [os.path.relpath(folder / p, out) for folder, r in loaded for p in r["missing"]]
    merged = {
        **first,
        "command": _command_for(first["command"], sorted(seeds), out),
        "seeds": sorted(seeds),
        "models": models,
        "missing": missing,
        "summary": summarize(models, first["tests"]),
        "backend_info": _joined(r["backend_info"] for _, r in loaded),
        "compute_seconds": sum(r["compute_seconds"] for _, r in loaded),
        "wall_seconds": sum(r["wall_seconds"] for _, r in loaded),
        "machine": _machine([r["machine"] for _, r in loaded]),
        "created": max(r["created"] for _, r in loaded),
        # each folder as it was: its own command, seeds, machine and date (a merged one's parts, flat)
        "merged_from": [part for folder, r in loaded for part in _parts(folder, r, out)],
    }
    out.mkdir(parents=True, exist_ok=True)
    write_results(out, merged)
    return merged


def _check_out(out: Path) -> None:
    """OUT may be new, empty, or hold an earlier merge (rewritten); never another experiment's results."""
    try:
        held = json.loads((out / "results.json").read_text())
    except FileNotFoundError:
        return
    except (OSError, ValueError, RecursionError):
        raise CapsctlError(f"--out {out}: holds an unreadable results.json; give a new folder") from None
    if not (isinstance(held, dict) and "merged_from" in held):
        raise CapsctlError(f"--out {out}: holds the results of an experiment; give a new folder")


def _command_for(command: str, seeds: list[int], out: Path) -> str:
    """The one `experiment pairs` command that would run every merged seed into OUT."""
    words = [w for w in shlex.split(command) if w != "--no-train"]
    for flag, value in (("--seeds", ",".join(map(str, seeds))), ("--out", str(out))):
        if flag in words:
            words[words.index(flag) + 1] = value
        else:
            words += [flag, value]
    return shlex.join(words)


def _joined(values: Any) -> str:
    return "; ".join(dict.fromkeys(values))  # (each once, in order)


def _machine(machines: list[dict[str, Any]]) -> dict[str, Any]:
    """One machine record: the CPUs and core counts, each named once; the first folder's load."""
    merged = dict(machines[0])
    for key in ("cpu", "cores"):
        if any(m.get(key) != merged.get(key) for m in machines):
            merged[key] = _joined(str(m.get(key, "?")) for m in machines)
    return merged


def _parts(folder: Path, r: dict[str, Any], out: Path) -> list[dict[str, Any]]:
    if r.get("merged_from"):  # (paths were relative to that merge's folder)
        return [{**p, "folder": os.path.relpath(folder / p["folder"], out)} for p in r["merged_from"]]
    return [
        {
            "folder": os.path.relpath(folder, out),
            "command": r["command"],
            "seeds": r["seeds"],
            "backend_info": r["backend_info"],
            "machine": r["machine"],
            "created": r["created"],
        }
    ]
