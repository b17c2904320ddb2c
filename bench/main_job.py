"""The README's main job (train + eval-pairs on the embedded mnist-5k): old default vs new, side by side.

    python bench/main_job.py                     # 30 epochs, 3 repeats each, interleaved (about an hour)
    python bench/main_job.py --epochs 3 --repeats 3 --json out.json

"old" is the main job as it ran before per-epoch curve scoring (every epoch scored on all 10,000 test images:
`capsctl train --curve-images 0`), "new" is today's default. Both train exactly the same weights (scoring
never touches them), so the ratio is what the default's scoring change buys. Runs alternate old/new so a
change of machine load hits both; the figure is the median wall time of each, and the machine is named.
Never run this beside another job.
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

from capsctl.bench.machine import machine

VARIANTS = {"old": ["--curve-images", "0"], "new": []}


def one_run(variant: str, epochs: int, backend: str) -> dict[str, float]:
    with tempfile.TemporaryDirectory(prefix="capsctl-mainjob-") as tmp:
        run = Path(tmp) / "run"
        cli = [sys.executable, "-m", "capsctl"]
        t0 = time.perf_counter()
        subprocess.run(
            [
                *cli,
                "train",
                "--epochs",
                str(epochs),
                "--backend",
                backend,
                "--out",
                str(run),
                "-q",
                *VARIANTS[variant],
            ],
            check=True,
            capture_output=True,
        )
        t1 = time.perf_counter()
        subprocess.run(
            [*cli, "eval-pairs", str(run / "model.safetensors"), "--backend", backend],
            check=True,
            capture_output=True,
        )
        t2 = time.perf_counter()
        rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return {
        "train_s": t1 - t0,
        "eval_pairs_s": t2 - t1,
        "total_s": t2 - t0,
        "train_loop_s": sum(r["seconds"] for r in rows),
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--epochs", type=int, default=30)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--backend", default="torch")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    runs: dict[str, list[dict[str, float]]] = {v: [] for v in VARIANTS}
    for i in range(args.repeats):
        for variant in VARIANTS:
            r = one_run(variant, args.epochs, args.backend)
            runs[variant].append(r)
            print(
                f"[{i + 1}/{args.repeats}] {variant}: {r['total_s']:.1f} s (train {r['train_s']:.1f} s, of "
                "which "
                f"steps {r['train_loop_s']:.1f} s; eval-pairs {r['eval_pairs_s']:.1f} s)",
                flush=True,
            )
    med = {v: statistics.median(r["total_s"] for r in rs) for v, rs in runs.items()}
    ratios = [n["total_s"] / o["total_s"] for o, n in zip(runs["old"], runs["new"], strict=True)]
    report = {
        "machine": machine(),
        "epochs": args.epochs,
        "backend": args.backend,
        "runs": runs,
        "median_total_s": med,
        "ratio_new_over_old": statistics.median(ratios),
    }
    print(
        f"median: old {med['old']:.1f} s, new {med['new']:.1f} s; new/old {report['ratio_new_over_old']:.3f} "
        f"(median of the per-pair ratios) on {report['machine']['cpu']}"
    )
    if args.json:
        args.json.write_text(json.dumps(report, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
