"""`capsctl predict` over a folder of PNG files vs `eval`'s scoring of the same images in memory.

Target (issue 12): predict's images/s (listing, decoding each PNG, batching, scoring, writing JSON lines)
within 1.5x of a bare scoring pass over the same images already decoded in memory. Both are timed in
this one process after one untimed warm-up, interleaved round by round; the ratio is the median of the
per-round ratios (the machine is shared and noisy, a ratio of neighbours is what holds).

    python tools/export_imagefolder.py mnist-5k /tmp/mnist5k-png   # 10,000 test PNGs under test/
    python bench/predict_vs_eval.py /tmp/mnist5k-png/test [--model M] [--backend torch] [--rounds 3]
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np

from capsctl._script_args import check_counts
from capsctl.backend import get_backend
from capsctl.cli._predict import _Writer, class_names, collect_paths, run_predictions
from capsctl.data.images import load_image
from capsctl.errors import run_script
from capsctl.model.shipped import shipped_model
from capsctl.model.weights import load_model


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("folder", type=Path, help="a folder of images (searched recursively)")
    ap.add_argument("--model", type=Path, help="a model file (default: the model shipped with capsctl)")
    ap.add_argument("--backend", default="torch")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--batch-size", type=int, default=512)
    args = ap.parse_args()
    check_counts(args, "rounds", "batch-size")

    spec, weights = load_model(args.model or shipped_model())
    runner = get_backend(args.backend).runner(spec, weights)
    paths, _ = collect_paths([str(args.folder)], None)
    # the in-memory images eval would score: the same files, decoded once, untimed
    x = np.stack([load_image(p, invert="no", channels=spec.in_channels) for p in paths])
    if x.ndim == 3:
        x = x[..., None]

    def predict_pass() -> float:
        t = time.perf_counter()
        writer = _Writer("json", 3, class_names(spec))
        with contextlib.redirect_stdout(io.StringIO()):  # the JSON lines are written, then dropped
            for result in run_predictions(
                paths, runner.scores, spec, invert="no", resize=None, batch_size=args.batch_size
            ):
                writer.write(result, 3, 0.5)
        return time.perf_counter() - t

    def eval_pass() -> float:
        t = time.perf_counter()
        for i in range(0, len(x), args.batch_size):
            runner.scores(x[i : i + args.batch_size])
        return time.perf_counter() - t

    predict_pass(), eval_pass()  # warm-up: page cache, allocator, thread pools
    rows = []
    for r in range(args.rounds):
        if r % 2 == 0:  # alternate which goes first
            a = predict_pass()
            b = eval_pass()
        else:
            b = eval_pass()
            a = predict_pass()
        rows.append({"predict_s": a, "eval_s": b, "ratio": a / b})
    n = len(paths)
    summary = {
        "images": n,
        "backend": args.backend,
        "predict_img_s": n / statistics.median(r["predict_s"] for r in rows),
        "eval_img_s": n / statistics.median(r["eval_s"] for r in rows),
        "ratio_median": statistics.median(r["ratio"] for r in rows),
        "ratios": [round(r["ratio"], 3) for r in rows],
        "target": 1.5,
    }
    summary["met"] = summary["ratio_median"] <= 1.5
    print(json.dumps(summary))


if __name__ == "__main__":
    sys.exit(run_script(main))
