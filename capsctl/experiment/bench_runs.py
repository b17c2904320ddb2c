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

from capsctl.bench.machine import cpu_text
from capsctl.errors import CapsctlError
from capsctl.experiment.tables import table

BENCH_KIND = "bench"
ARCH_PREFIX = "arch:"  # (capsctl.bench.measure's name for an --arch variant; that module imports numpy)
_REPORT_KEYS = ("machine", "config", "backends", "flops_per_image")
# options whose flag is not the field's name (capsctl bench renamed them; the JSON keeps the field names)
_FLAGS = {"batch": "--batch-size", "infer_batch": "--infer-batch-size"}


def is_bench_report(data: object) -> bool:
    return isinstance(data, dict) and all(k in data for k in _REPORT_KEYS)


def bench_command(config: dict[str, Any]) -> str:
    """The `capsctl bench` command line that measures what `config` (a report's "config") did: the
    options that differ from their defaults, --arch for the architecture variants (the seed preset's
    capsule head is `--arch seed` when other architectures were measured with it)."""
    from capsctl.bench.measure import BenchConfig

    words = ["capsctl", "bench"]
    variants = list(config["heads"])
    archs = [v[len(ARCH_PREFIX) :] if v.startswith(ARCH_PREFIX) else "seed" for v in variants]
    for f in fields(BenchConfig):
        value = config.get(f.name, f.default)
        if f.name == "heads":
            if any(v.startswith(ARCH_PREFIX) for v in variants):
                heads = [v for v in variants if v != "capsule" and not v.startswith(ARCH_PREFIX)]
                words += ["--heads", ",".join(heads)] if heads else []
                arch_of = [a for v, a in zip(variants, archs, strict=True) if v not in heads]
                words += ["--arch", ",".join(arch_of)]
            elif tuple(value) != f.default:
                words += ["--heads", ",".join(value)]
        elif f.name == "routing":
            words += [] if value else ["--no-routing"]
        elif (tuple(value) if isinstance(value, list) else value) != f.default:
            flag = _FLAGS.get(f.name, "--" + f.name.replace("_", "-"))
            words += [flag, ",".join(value) if isinstance(value, list) else str(value)]
    return shlex.join([*words, "--json"])


def load_bench_runs(folder: Path) -> dict[str, Any]:
    """The bench reports in `folder` (every *.json that is one), grouped by the command that wrote them;
    a folder with none, or a file that is not JSON, is one line naming it."""
    groups: dict[str, dict[str, Any]] = {}
    for path in sorted(folder.glob("*.json")):
        try:
            data = json.loads(path.read_text())
        except (OSError, ValueError) as e:
            raise CapsctlError(f"{path}: unreadable ({e})") from None
        if not is_bench_report(data):
            continue
        try:
            key = bench_command(data["config"])
        except (KeyError, TypeError, AttributeError, ValueError) as e:
            raise CapsctlError(f"{path}: damaged bench report ({type(e).__name__}: {e})") from None
        group = groups.setdefault(key, {"command": key, "files": [], "runs": []})
        group["files"].append(path.name)
        group["runs"].append(data)
    if not groups:
        raise CapsctlError(
            f"{folder}: neither a results.json nor a `capsctl bench --json` output (*.json) in it"
        )
    for group in groups.values():
        try:
            bench_markdown(folder.name, group)  # (every field the report reads, read once here)
        except (KeyError, TypeError, IndexError, AttributeError, ValueError, statistics.StatisticsError) as e:
            raise CapsctlError(
                f"{folder / group['files'][0]}: damaged bench report ({type(e).__name__}: {e})"
            ) from None
    return {"kind": BENCH_KIND, "groups": list(groups.values())}


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


def bench_markdown(folder_name: str, group: dict[str, Any]) -> str:
    """One command's runs: where and when they ran, and per variant its parameters, FLOPs and, on every
    backend, training images/s and FLOP rate against the sgemm (medians over the runs)."""
    runs = group["runs"]
    config = runs[0]["config"]
    variants = list(config["heads"])
    with_archs = any(v.startswith(ARCH_PREFIX) for v in variants)
    backends = list(config["backends"])
    cpus = sorted({f"{r['machine'].get('cores', '?')} cores ({cpu_text(r['machine'])})" for r in runs})
    loads = [(r["machine"].get("loadavg_before") or r["machine"].get("loadavg") or [None])[0] for r in runs]
    load_text = ", ".join("?" if x is None else f"{float(x):.2f}" for x in loads)
    taken = [r.get("created") for r in runs]
    when = ", ".join(t for t in taken if t) if all(taken) else "not recorded (the JSON predates `created`)"
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
    n = len(runs)
    return "\n".join(
        [
            f"### Training speed ({folder_name}): {n} run{'s' if n != 1 else ''} of one command\n",
            f"```\n{group['command']}\n```\n",
            f"Files: {', '.join(group['files'])}. Taken: {when}. Machine: {'; '.join(cpus)}; 1-minute load "
            f"average before each run: {load_text}.\n",
            f"Training images/s at batch {config['batch']}, each model on its own design size (28×28 digits; "
            "36×36 composites for `efficient-multimnist`), synthetic images fed from memory. Bold: the "
            "median over the runs, each run's own figure beside it (a run's figure is the median of its "
            f"{config['windows']} timed windows). FLOP rate / sgemm: the training step's FLOP rate per "
            "CPU-second as a fraction of the same backend's float32 matmul's, measured in the same run.\n",
            table(header, rows),
        ]
    )
