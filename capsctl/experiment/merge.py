"""One results.json from several `experiment pairs` folders that ran the same experiment on other seeds
(one machine or process each, or a seed added in a later session whose first runs are gone): the
models' records are taken as they were scored, and the means over seeds are computed again."""

from __future__ import annotations

import json
import os
import shlex
import shutil
import tempfile
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

from capsctl.errors import CapsctlError
from capsctl.experiment.results import DAMAGE, command_with, load_results, write_results
from capsctl.experiment.scoring import summarize
from capsctl.training.run_folder import missing_folders, remove_empty

# what may differ between the merged folders: the seeds and their models, and where and when they ran;
# every other field of results.json says what the experiment was and must be the same in each
PER_FOLDER = frozenset(
    {
        "command",
        "seeds",
        "heads",  # (compared as a set: the order is the command's)
        "tests",  # (likewise)
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
# what may differ between two models of one head: their seed and where their data lay
PER_MODEL_CONFIG = frozenset({"seed", "data_dir"})
# what a model's record needs for the merged tables and plots
MODEL_FIELDS = ("head", "seed", "run", "status", "spec", "config", "parameters", "epochs", "train_seconds",
                "images_per_s", "score_seconds", "curve", "tests")
# fields that follow from others (curve_test_images from --eval-limit and the test images)
DERIVED = frozenset({"curve_test_images", "train_images"})
# what each row of a model's curve holds (capsctl.experiment.run)
CURVE_FIELDS = ("epoch", "loss", "train_accuracy", "test_accuracy", "lr")
# what results.json files written before a field existed meant by its absence (or null)
ABSENT_MEANT = {"arch": "seed", "decoder": False}


def merge_results(folders: Sequence[Path], out: Path) -> dict[str, Any]:
    """Write OUT/results.json (with its table and plots) holding every seed of `folders`; returns it."""
    if len(folders) < 2:
        raise CapsctlError("give at least two result folders to merge")
    out_real = os.path.realpath(out)
    if any(os.path.realpath(f) == out_real for f in folders):
        raise CapsctlError(f"--out {out}: is one of the folders merged; give a new folder")
    _check_out(out)
    loaded = [(Path(os.path.realpath(f)), f, load_results(f)) for f in folders]
    for _, folder, r in loaded:
        _check_fields(folder, r)
    _, first_folder, first = loaded[0]
    for _, folder, r in loaded[1:]:
        _check_same(first_folder, first, folder, r)
    _check_models_alike(loaded)
    taken: dict[tuple[int, str], Path] = {}
    for _, folder, r in loaded:
        for m in r["models"]:
            if (m["seed"], m["head"]) in taken:
                raise CapsctlError(
                    f"{folder}: seed {m['seed']} ({m['head']}) is in {taken[m['seed'], m['head']]} too; "
                    "merge each model once"
                )
            taken[m["seed"], m["head"]] = folder
    heads = first["heads"]
    models = [
        {**m, "run": os.path.relpath(real / m["run"], out_real)} for real, _, r in loaded for m in r["models"]
    ]
    models.sort(key=lambda m: (m["seed"], heads.index(m["head"])))  # (as one run of all the seeds lists them)
    seeds = sorted({seed for _, _, r in loaded for seed in r["seeds"]})  # (asked for; unfinished ones too)
    finished = {Path(m["run"]).name for m in models}
    # a run one folder left unfinished that another finished is not missing from the merge
    missing = [
        os.path.relpath(real / p, out_real)
        for real, _, r in loaded
        for p in r["missing"]
        if Path(p).name not in finished
    ]
    parts = [part for real, folder, r in loaded for part in _parts(real, folder, r, out_real)]
    merged = {
        **first,
        # the one `experiment pairs` command that would run every merged seed into OUT (not run as one:
        # `experiment report` shows it as their equivalent, beside each part's own)
        "command": command_with(first["command"], seeds=",".join(map(str, seeds)), out=str(out)),
        "seeds": seeds,
        "models": models,
        "missing": missing,
        "summary": summarize(models, first["tests"]),
        "backend_info": _joined(str(p["backend_info"]) for p in parts),
        "compute_seconds": sum(m["train_seconds"] + m["score_seconds"] for m in models),
        "wall_seconds": None,  # (the parts may have run at once, on several machines: no one wall time)
        "machine": _machine([p["machine"] for p in parts]),
        "created": max(str(p["created"]) for p in parts),
        # each folder as it was: its own command, seeds, machine and date (a merged one's parts, flat)
        "merged_from": parts,
    }
    _write(out, merged)
    return merged


def _write(out: Path, merged: dict[str, Any]) -> None:
    """results.json, results.md and plots made in a folder beside OUT, then moved in: a merge that fails
    (or is interrupted) leaves OUT as it was."""
    made = missing_folders(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".merging", dir=out.parent))
    try:
        write_results(staging, merged)
        out.mkdir(exist_ok=True)
        files = sorted(staging.iterdir(), key=lambda f: f.name == "results.json")  # (results.json last)
        for f in files:
            os.replace(f, out / f.name)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        remove_empty(made)
        raise
    shutil.rmtree(staging, ignore_errors=True)


def _check_out(out: Path) -> None:
    """OUT may be new, empty, or hold an earlier merge (rewritten); never another experiment's folder."""
    if out.exists() and not out.is_dir():
        raise CapsctlError(f"--out {out}: is a file, not a folder")
    try:
        held = json.loads((out / "results.json").read_text())
    except FileNotFoundError:
        if out.is_dir() and any(out.iterdir()):
            raise CapsctlError(f"--out {out}: is not empty; give a new folder") from None
        return
    except (OSError, ValueError, RecursionError):
        raise CapsctlError(f"--out {out}: holds an unreadable results.json; give a new folder") from None
    if not (isinstance(held, dict) and "merged_from" in held):
        raise CapsctlError(f"--out {out}: holds the results of an experiment; give a new folder")


def _check_fields(folder: Path, r: dict[str, Any]) -> None:
    """What the merge reads beyond what `load_results` checked: named with its file, never a traceback."""
    where = folder / "results.json"
    if r["kind"] != "pairs":
        raise CapsctlError(f"{folder}: holds an ablation; merge takes the results of `experiment pairs`")
    for key in ("command", "heads", "tests", "models", "missing"):
        if not isinstance(r.get(key), str if key == "command" else list):
            raise CapsctlError(f"{where}: damaged results file (its '{key}' is missing or of the wrong type)")
    for m in r["models"]:
        gone = [k for k in MODEL_FIELDS if not isinstance(m, dict) or k not in m]
        if gone or not _well_formed(m) or m["head"] not in r["heads"]:
            what = f"without '{gone[0]}'" if gone else "of the wrong form"
            raise CapsctlError(f"{where}: damaged results file (a model record {what})")
    try:  # (the parts as the merged file records them, with their own sums)
        summarize(r["models"], r["tests"])
        shlex.split(r["command"])
        for m in r["models"]:
            _settings(m, "config")
            _settings(m, "spec")
    except DAMAGE as e:
        raise CapsctlError(f"{where}: damaged results file ({type(e).__name__}: {e})") from None
    except CapsctlError as e:  # (a config or spec today's code refuses: said as the file's damage)
        raise CapsctlError(f"{where}: damaged results file (a model's settings: {e})") from None


def _well_formed(m: dict[str, Any]) -> bool:
    """The types the merged tables, plots and paths read (each curve row as `experiment pairs` writes it)."""
    curve = m["curve"]
    return (
        isinstance(m["config"], dict)
        and isinstance(m["run"], str)
        and isinstance(m["seed"], int)
        and isinstance(curve, list)
        and all(isinstance(row, dict) and set(CURVE_FIELDS) <= set(row) for row in curve)
    )


def _check_same(first_folder: Path, first: dict[str, Any], folder: Path, r: dict[str, Any]) -> None:
    """Every setting of the experiment but the seeds (an option the user gave named before what it
    sets: --eval-limit before the curve's test images)."""
    keys = (set(first) | set(r)) - PER_FOLDER
    sets = {k: (sorted(first[k]), sorted(r[k])) for k in ("heads", "tests")}
    differ = [k for k in keys if _get(first, k) != _get(r, k)] + [k for k, (a, b) in sets.items() if a != b]
    differ.sort(key=lambda k: (k in DERIVED, k))
    if differ:
        key = differ[0]
        raise CapsctlError(
            f"{folder}: not the same experiment as {first_folder} ({key}: {_get(r, key)!r} against "
            f"{_get(first, key)!r}); only the seeds may differ"
        )


def _check_models_alike(loaded: Sequence[tuple[Path, Path, dict[str, Any]]]) -> None:
    """Each head's models trained alike in every folder: each is compared with the first of its head in
    any folder (a recipe's name has meant other settings over time: the config says what each trained
    with)."""
    first: dict[str, tuple[Path, dict[str, Any]]] = {}
    for _, folder, r in loaded:
        for m in r["models"]:
            ref_folder, ref = first.setdefault(m["head"], (folder, m))
            for key in ("spec", "parameters", "epochs", "config"):
                a, b = _settings(ref, key), _settings(m, key)
                if a != b:
                    field = key if key != "config" else "config." + next(
                        (k for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)), "?"
                    )
                    raise CapsctlError(
                        f"{folder}: its {m['head']} model of seed {m['seed']} trained otherwise than seed "
                        f"{ref['seed']}'s in {ref_folder} ({field} differs); only the seeds may differ"
                    )


def _settings(model: dict[str, Any], key: str) -> Any:
    """A model's `key` as today's code reads it: a config or spec written before a field existed has that
    field's default (what it meant), so the same settings compare equal across versions."""
    value = model[key]
    if key == "config":
        from capsctl.training.config import TrainConfig

        full = asdict(TrainConfig.from_json(json.dumps(value)))
        return {k: v for k, v in full.items() if k not in PER_MODEL_CONFIG}
    if key == "spec":
        from capsctl.model.spec import ModelSpec

        return ModelSpec.from_dict(value).to_dict()
    return value


def _get(results: dict[str, Any], key: str) -> Any:
    value = results.get(key)
    return ABSENT_MEANT.get(key) if value is None else value


def _joined(values: Any) -> str:
    return "; ".join(dict.fromkeys(values))  # (each once, in order)


def _machine(machines: list[Any]) -> dict[str, Any]:
    """One machine record: the CPUs and core counts of the parts, each named once (no load: the parts
    ran at other times)."""
    dicts = [m if isinstance(m, dict) else {} for m in machines]
    merged = {k: v for k, v in dicts[0].items() if not k.startswith("loadavg")}
    for key in ("cpu", "cpu_detail", "cores"):
        if any(m.get(key) != merged.get(key) for m in dicts):
            merged[key] = _joined(str(m.get(key, "?")) for m in dicts)
    return merged


# what each part of a merge records, and of what type (read here and by `experiment report`)
PART_FIELDS = {
    "folder": str, "command": str, "seeds": list, "backend_info": str, "machine": dict, "created": str
}


def _part_well_formed(part: Any) -> bool:
    return isinstance(part, dict) and all(isinstance(part.get(k), t) for k, t in PART_FIELDS.items())


def _parts(real: Path, folder: Path, r: dict[str, Any], out_real: str) -> list[dict[str, Any]]:
    if "merged_from" in r:  # (its paths were relative to that merge's folder)
        parts = r["merged_from"]
        if not (isinstance(parts, list) and parts and all(_part_well_formed(p) for p in parts)):
            raise CapsctlError(f"{folder / 'results.json'}: damaged results file (its 'merged_from')")
        return [{**p, "folder": os.path.relpath(real / p["folder"], out_real)} for p in parts]
    return [
        {
            "folder": os.path.relpath(real, out_real),
            "command": r["command"],
            "seeds": sorted({m["seed"] for m in r["models"]}),
            "backend_info": str(r.get("backend_info", r["backend"])),
            "machine": r["machine"] if isinstance(r.get("machine"), dict) else {},
            "created": str(r.get("created", "?")),
        }
    ]
