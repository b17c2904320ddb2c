"""The README's main job (`capsctl train` + `capsctl eval-pairs`, embedded mnist-5k): old default vs new.

    python bench/main_job.py --json out.json            # 3 repeats of each, interleaved (about 70 minutes)
    python bench/main_job.py --epochs 2 --repeats 1      # a smoke run of the script itself
    python bench/main_job.py --runs runs.jsonl --first 2 --repeats 1   # add repeat 3 to earlier runs
    python bench/main_job.py --runs runs.jsonl --repeats 0 --json out.json  # summarise runs.jsonl only

"old" is the main job as it ran until 2026-11-29: the recipe now called `default-2026-11` (30 epochs at
batch 128), every epoch scored on all 10,000 test images (`--curve-images 0`). "new" is today's plain
`capsctl train`. Each runs at its own recipe's epochs unless --epochs is given. Repeat i trains with seed
i on both (the wall time does not depend on the seed), so the new runs' accuracies are also a 3-seed check
of the new recipe. Runs alternate old/new so a change of machine load hits both; the figure is the median
wall time of each and the median of the per-pair ratios, and the machine is named. Never run this beside
another job.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from capsctl._io import atomic_write_bytes
from capsctl._script_args import check_counts, check_json_out
from capsctl.bench.machine import machine
from capsctl.errors import CapsctlError, run_script

VARIANTS = {"old": ["--recipe", "default-2026-11", "--curve-images", "0"], "new": []}


def one_run(variant: str, epochs: int | None, backend: str, seed: int) -> dict[str, float]:
    with tempfile.TemporaryDirectory(prefix="capsctl-mainjob-") as tmp:
        run = Path(tmp) / "run"
        cli = [sys.executable, "-m", "capsctl"]
        extra = [] if epochs is None else ["--epochs", str(epochs)]
        t0 = time.perf_counter()
        subprocess.run(
            [*cli, "train", "--backend", backend, "--seed", str(seed), "--out", str(run), "-q", *extra]
            + VARIANTS[variant],
            check=True,
            capture_output=True,
        )
        t1 = time.perf_counter()
        pairs = subprocess.run(
            [*cli, "eval-pairs", str(run / "model.safetensors"), "--backend", backend, "--json"],
            check=True,
            capture_output=True,
            text=True,
        )
        t2 = time.perf_counter()
        rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    scored = json.loads(pairs.stdout)
    return {
        "seed": seed,
        "epochs": len(rows),
        "train_s": t1 - t0,
        "eval_pairs_s": t2 - t1,
        "total_s": t2 - t0,
        "train_loop_s": sum(r["seconds"] for r in rows),
        "test_accuracy": rows[-1]["test_accuracy"],
        "vertical_accuracy": scored["accuracy"],
        "vertical_confident_accuracy": scored["confident_accuracy"],
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--epochs", type=int, help="the same epochs for both (default: each recipe's own)")
    ap.add_argument("--repeats", type=int, default=3, help="runs of each to add (0: summarise --runs)")
    ap.add_argument("--backend", default="torch")
    ap.add_argument("--json", type=Path)
    ap.add_argument(
        "--runs", type=Path, help="JSON-lines file: earlier runs are read from it, each new run is appended"
    )
    ap.add_argument("--first", type=int, default=0, help="index (and seed) of the first repeat")
    args = ap.parse_args()
    check_counts(args, "repeats", least=0)
    check_counts(args, "epochs")
    check_json_out(args.json)
    if args.repeats == 0 and (args.runs is None or not args.runs.is_file()):
        raise CapsctlError("--repeats 0 only summarises earlier runs: give --runs FILE holding some")
    runs: dict[str, list[dict[str, float]]] = {v: [] for v in VARIANTS}
    if args.runs is not None and args.runs.exists():
        for line in args.runs.read_text().splitlines():
            r = json.loads(line)
            runs[r.pop("variant")].append(r)
    for i in range(args.first, args.first + args.repeats):
        for variant in VARIANTS:
            r = one_run(variant, args.epochs, args.backend, seed=i)
            runs[variant].append(r)
            if args.runs is not None:  # kept as it goes: an interrupted bench loses one run at most
                with args.runs.open("a") as f:
                    f.write(json.dumps({"variant": variant, **r}) + "\n")
            print(
                f"[{i + 1}/{args.repeats}] {variant} (seed {i}, {r['epochs']:.0f} epochs): "
                f"{r['total_s']:.1f} s "
                f"(train {r['train_s']:.1f} s, of which steps {r['train_loop_s']:.1f} s; eval-pairs "
                f"{r['eval_pairs_s']:.1f} s); test {r['test_accuracy']:.2%}, vertical pairs "
                f"{r['vertical_accuracy']:.2%} / {r['vertical_confident_accuracy']:.2%}",
                flush=True,
            )
    med = {v: statistics.median(r["total_s"] for r in rs) for v, rs in runs.items()}
    # a pair is the old and new run of one repeat (same seed), run one after the other
    new_by_seed = {r["seed"]: r for r in runs["new"]}
    ratios = [
        new_by_seed[o["seed"]]["total_s"] / o["total_s"] for o in runs["old"] if o["seed"] in new_by_seed
    ]
    report = {
        "machine": machine(),
        "epochs": args.epochs,
        "backend": args.backend,
        "runs": runs,
        "median_total_s": med,
        "ratio_new_over_old": statistics.median(ratios),
        "per_pair_ratios": ratios,
    }
    print(
        f"median: old {med['old']:.1f} s, new {med['new']:.1f} s; new/old {report['ratio_new_over_old']:.3f} "
        f"(median of the per-pair ratios) on {report['machine']['cpu']}"
    )
    if args.json:
        atomic_write_bytes(args.json, (json.dumps(report, indent=1) + "\n").encode())
    return 0


if __name__ == "__main__":
    sys.exit(run_script(main))
