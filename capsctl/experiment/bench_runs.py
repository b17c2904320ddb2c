"""A folder of `capsctl bench --json` outputs, as `capsctl experiment report` shows it: the runs of each
command grouped, every figure the median over its runs with each run's own beside it.

Speed is noisy on a shared machine, so a speed figure is taken several times (bench-1.json,
bench-2.json, …) and its median reported; the runs' own figures stay visible so a reader can see the
spread. Nothing here runs a measurement: it reads the JSON that `capsctl bench --json` printed.
"""

from __future__ import annotations

import json
import shlex
import statistics
from collections.abc import Callable
from dataclasses import fields
from pathlib import Path
from typing import Any

from capsctl.bench import ARCH_PREFIX
from capsctl.bench.machine import machine_text
from capsctl.errors import CapsctlError
from capsctl.experiment.tables import table

BENCH_KIND = "bench"
_REPORT_KEYS = ("machine", "config", "backends", "flops_per_image")
# options whose flag is not the field's name (capsctl bench renamed them; the JSON keeps the field names)
_FLAGS = {"batch": "--batch-size", "infer_batch": "--infer-batch-size"}


def is_bench_report(data: object) -> bool:
    return isinstance(data, dict) and all(k in data for k in _REPORT_KEYS)


def _variant_options(variants: list[str]) -> list[str]:
    """--heads and --arch as `capsctl bench` turns them back into these variants, in this order: the
    heads first (the variants before the first architecture), then --arch's, the seed preset's capsule
    head named `seed` there. The order matters: it is the order the training steps are timed in."""
    first = next((i for i, v in enumerate(variants) if v.startswith(ARCH_PREFIX)), None)
    if first is None:
        return ["--heads", ",".join(variants)]
    heads, rest = variants[:first], variants[first:]
    if heads == ["capsule"]:  # (`--arch seed,…` asks for the same, in the same order)
        heads, rest = [], variants
    archs = [v[len(ARCH_PREFIX) :] if v.startswith(ARCH_PREFIX) else "seed" for v in rest]
    return (["--heads", ",".join(heads)] if heads else []) + ["--arch", ",".join(archs)]


def bench_command(config: dict[str, Any]) -> str:
    """The `capsctl bench` command line that measures what `config` (a report's "config") did: the
    options that differ from their defaults, in today's names."""
    from capsctl.bench.measure import BenchConfig

    words = ["capsctl", "bench"]
    for f in fields(BenchConfig):
        value = config.get(f.name, f.default)
        value = tuple(value) if isinstance(value, list) else value
        if f.name == "heads":
            with_archs = any(v.startswith(ARCH_PREFIX) for v in value)
            words += _variant_options(list(value)) if with_archs or value != f.default else []
        elif f.name == "routing":
            words += [] if value else ["--no-routing"]
        elif f.name == "image_size":
            words += ["--image-size", "{}x{}".format(*value)] if value else []
        elif value != f.default:
            flag = _FLAGS.get(f.name, "--" + f.name.replace("_", "-"))
            words += [flag, ",".join(value) if isinstance(value, tuple) else str(value)]
    return shlex.join([*words, "--json"])


def load_bench_runs(folder: Path) -> dict[str, Any]:
    """The bench reports in `folder` (every *.json that is one), grouped by the command that wrote them
    and the machine it ran on; a folder with none, or a file that is not JSON, is one line naming it."""
    groups: dict[str, dict[str, Any]] = {}
    for path in sorted(folder.glob("*.json")):
        try:
            data = json.loads(path.read_text())
        except (OSError, ValueError) as e:
            raise CapsctlError(f"{path}: unreadable ({e})") from None
        if not is_bench_report(data):
            continue
        try:
            command, where = bench_command(data["config"]), machine_text(data["machine"])
        except (KeyError, TypeError, AttributeError, ValueError) as e:
            raise CapsctlError(f"{path}: damaged bench report ({type(e).__name__}: {e})") from None
        # (one median per command and machine: CPUs a generation apart differ by 2× on the same command)
        group = groups.setdefault(
            f"{command} on {where}", {"command": command, "machine": where, "files": [], "runs": []}
        )
        group["files"].append(path.name)
        group["runs"].append(data)
    if not groups:
        raise CapsctlError(
            f"{folder}: neither a results.json nor a `capsctl bench --json` output (*.json) in it"
        )
    for group in groups.values():  # (every field the report reads, read once here)
        failure = _fails(folder.name, group)
        if failure is not None:
            pairs = zip(group["files"], group["runs"], strict=True)
            alone = [{**group, "files": [f], "runs": [r]} for f, r in pairs]
            name = next((g["files"][0] for g in alone if _fails(folder.name, g)), group["files"][0])
            why = f"{type(failure).__name__}: {failure}"
            raise CapsctlError(f"{folder / name}: damaged bench report ({why})")
    return {"kind": BENCH_KIND, "groups": list(groups.values())}


def _fails(folder_name: str, group: dict[str, Any]) -> Exception | None:
    """What rendering `group` raises where a report's field is missing or of the wrong type."""
    try:
        bench_markdown(folder_name, group)
    except (KeyError, TypeError, IndexError, AttributeError, ValueError, statistics.StatisticsError) as e:
        return e
    return None


def _label(variant: str, with_archs: bool) -> str:
    if variant.startswith(ARCH_PREFIX):
        return f"`{variant[len(ARCH_PREFIX) :]}`"
    # (beside --arch variants the capsule head is the seed preset; alone, the heads are the seed model's)
    return "`seed`" if with_archs and variant == "capsule" else f"`seed`, {variant} head"


def _figures(runs: list[dict[str, Any]], backend: str, variant: str, field: str) -> list[float | None]:
    """`field` of one variant on one backend in each run: None where that run has no figure (the
    backend was not available there, or its measurement failed)."""
    out: list[float | None] = []
    for run in runs:
        heads = run["backends"].get(backend, {}).get("heads", {})
        value = heads.get(variant, {}).get(field)
        out.append(None if value is None else float(value))
    return out


def _rate(v: float) -> str:
    return f"{v:.0f}" if v >= 100 else f"{v:.1f}"  # (sabour2017's 34.3 images/s keeps its tenth)


def _fraction(v: float) -> str:
    return f"{v:.2f}"


def _cell(values: list[float | None], fmt: Callable[[float], str]) -> str:
    got = [v for v in values if v is not None]
    if not got:
        return "—"
    median = f"**{fmt(statistics.median(got))}**"
    runs = ", ".join("—" if v is None else fmt(v) for v in values)
    return median if len(values) == 1 else f"{median} ({runs})"


def _load(m: dict[str, Any]) -> str:
    load = m.get("loadavg_before")  # (machine()'s own "loadavg" is taken after the measurement)
    x = load[0] if isinstance(load, list) and load else None
    return "?" if x is None or x != x else f"{float(x):.2f}"  # (x != x: NaN, where there is no load)


def _not_measured(group: dict[str, Any]) -> list[str]:
    """Why a run has no figures for a backend: not installed there, or its measurement failed."""
    notes = []
    for name, run in zip(group["files"], group["runs"], strict=True):
        for backend, r in run["backends"].items():
            if not r.get("available") or "error" in r:
                why = r.get("reason") or r.get("error") or "not available"
                notes.append(f"{name}: {backend} not measured ({why})")
    return notes


def _sizes(config: dict[str, Any]) -> str:
    """The images the run trained on: `--image-size`, or each model's design size."""
    size = config.get("image_size")
    if size:
        return "every model on {}×{} images".format(*size)
    return "each model on its own design size (28×28 digits; 36×36 composites for `efficient-multimnist`)"


def bench_markdown(folder_name: str, group: dict[str, Any]) -> str:
    """One command's runs on one machine: when they ran, and per variant its parameters, FLOPs and, on
    every backend, training images/s and FLOP rate against the sgemm (medians over the runs)."""
    runs = group["runs"]
    config = runs[0]["config"]
    variants = list(config["heads"])
    with_archs = any(v.startswith(ARCH_PREFIX) for v in variants)
    backends = list(config["backends"])
    taken = [r.get("created") for r in runs]
    when = ", ".join(t or "?" for t in taken) if any(taken) else "not recorded (the JSON predates `created`)"
    header = ["model", "parameters", "GFLOP per training image"]
    header += [f"{b} images/s" for b in backends] + [f"{b} FLOP rate / sgemm" for b in backends]
    rows = []
    for v in variants:
        params = next(
            (p for b in backends for p in _figures(runs, b, v, "parameters") if p is not None), None
        )
        gflop = runs[0]["flops_per_image"].get(v, {}).get("train_step")
        rows.append(
            [
                _label(v, with_archs),
                "—" if params is None else f"{int(params):,}",
                "—" if gflop is None else f"{gflop / 1e9:.2f}",
                *[_cell(_figures(runs, b, v, "train_images_per_s"), _rate) for b in backends],
                *[_cell(_figures(runs, b, v, "sgemm_fraction_cpu"), _fraction) for b in backends],
            ]
        )
    runs_text = f"{len(runs)} run{'s' if len(runs) != 1 else ''}"
    options = group["command"].removeprefix("capsctl bench").removesuffix("--json").strip()
    missing = _not_measured(group)
    return "\n".join(
        [
            f"### Training speed ({folder_name}): `{options or 'the defaults'}`, {runs_text} on "
            f"{group['machine']}\n",
            f"```\n{group['command']}\n```\n",
            f"Files: {', '.join(group['files'])}. Taken: {when}. 1-minute load average before each run: "
            f"{', '.join(_load(r['machine']) for r in runs)}.\n",
            f"Training images/s at batch {config['batch']}, {_sizes(config)}, synthetic images fed from "
            "memory. Bold: the median over the runs, each run's own figure beside it (a run's figure is "
            f"the median of its {config['windows']} timed windows). FLOP rate / sgemm: the training step's "
            "FLOP rate per CPU-second as a fraction of the same backend's float32 matmul's, measured in the "
            "same run.\n",
            table(header, rows),
            *(["Not measured: " + "; ".join(missing) + ".\n"] if missing else []),
        ]
    )
