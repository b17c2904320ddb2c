"""eval-pairs over all composites of the 10k test set vs a bare forward pass over the same images.

Target: the eval-pairs work (building the composites with numpy fancy indexing,
scoring them, top-k set matching) takes <= 1.1 x the bare forward pass. Both are timed in this
one process, interleaved round by round, and the ratio is the median of per-round ratios.

    python bench/eval_pairs_overhead.py --backend torch [--data-dir DIR] [--rounds 3]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

from capsctl._script_args import check_counts
from capsctl.backend import get_backend
from capsctl.data import datasets
from capsctl.data.composites import make_composites, score_sets
from capsctl.errors import run_script
from capsctl.model.spec import default_spec
from capsctl.model.weights import init_weights, load_model


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--backend", default="torch")
    ap.add_argument("--data-dir", help="a folder of MNIST's four IDX files (default: the shipped mnist-5k)")
    ap.add_argument("--model", help="a model file (default: the seed capsule model with initial weights)")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--limit", type=int, default=None, help="composites (default: all)")
    ap.add_argument("--batch-size", type=int, default=512)
    args = ap.parse_args()
    check_counts(args, "rounds", "limit", "batch-size")

    spec, weights = (
        load_model(args.model) if args.model else (default_spec(), init_weights(default_spec(), 0))
    )
    test = datasets.load("mnist" if args.data_dir else "mnist-5k", args.data_dir).test()
    runner = get_backend(args.backend).runner(spec, weights)
    prebuilt = make_composites(test.images, test.labels, limit=args.limit).images
    runner.scores(prebuilt[: args.batch_size], args.batch_size)  # warm-up

    rows = []
    for _ in range(args.rounds):
        t0 = time.perf_counter()
        runner.scores(prebuilt, args.batch_size)
        bare = time.perf_counter() - t0

        t0 = time.perf_counter()
        comp = make_composites(test.images, test.labels, limit=args.limit)
        t1 = time.perf_counter()
        scores = runner.scores(comp.images, args.batch_size)
        t2 = time.perf_counter()
        result = score_sets(scores, comp.labels)
        t3 = time.perf_counter()
        rows.append(
            {
                "bare_s": bare,
                "build_s": t1 - t0,
                "forward_s": t2 - t1,
                "score_s": t3 - t2,
                "eval_pairs_s": t3 - t0,
                "ratio": (t3 - t0) / bare,
            }
        )
    med = {k: statistics.median(r[k] for r in rows) for k in rows[0]}
    print(
        json.dumps(
            {
                "backend": args.backend,
                "composites": result["pairs"],
                "rounds": args.rounds,
                **{k: round(v, 4) for k, v in med.items()},
                "overhead_s": round(med["build_s"] + med["score_s"], 4),
            }
        )
    )


if __name__ == "__main__":
    sys.exit(run_script(main))
