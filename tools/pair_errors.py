"""Where do composite errors come from? Pair accuracy split by how the model does on each item alone.

For each composite layout, composites whose every item the model classifies correctly on its own
are scored apart from those holding at least one item it misses alone. If pair errors sit mostly
in the second group, the pair score is bounded by single-item accuracy (the recipe or the data),
not by the routing's handling of two objects. Also prints the bound an independent-errors model
gives: (single accuracy)^k.

    python tools/pair_errors.py MODEL --dataset fashion-mnist [--data-dir DIR] [--backend torch]
"""

from __future__ import annotations

import argparse
import json
import sys

import numpy as np

from capsctl._script_args import add_backend, add_data, add_model, test_images
from capsctl.backend import get_backend
from capsctl.data.composites import make_composites, set_matches
from capsctl.errors import run_script
from capsctl.model.fit import check_fit
from capsctl.model.weights import load_model


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_model(ap)
    add_data(ap)
    add_backend(ap)
    ap.add_argument(
        "--layouts",
        default="vertical,horizontal",
        help="comma-separated layouts to analyse (default: vertical,horizontal)",
    )
    ap.add_argument("--seed", type=int, default=0, help="pairing seed (the contract's default: 0)")
    args = ap.parse_args()

    test = test_images(args)
    spec, weights = load_model(args.model)
    check_fit(spec, test.images, test.labels, args.model, f"{args.dataset} test images")
    runner = get_backend(args.backend).runner(spec, weights)
    alone_ok = np.argmax(runner.scores(test.images), axis=1) == test.labels
    report: dict[str, object] = {"single_accuracy": float(alone_ok.mean())}
    for layout in args.layouts.split(","):
        light = spec.background == "light"  # (dark ink on light: overlap merged on white, as eval-pairs)
        c = make_composites(test.images, test.labels, digits=2, layout=layout, seed=args.seed, light=light)
        assert c.indices is not None
        correct, confident = set_matches(runner.scores(c.images), c.labels)
        both_ok = alone_ok[c.indices].all(axis=1)
        report[layout] = {
            "pairs": len(correct),
            "accuracy": float(correct.mean()),
            "confident_accuracy": float(confident.mean()),
            "share_with_an_item_missed_alone": float(1 - both_ok.mean()),
            "accuracy_when_both_right_alone": float(correct[both_ok].mean()) if both_ok.any() else None,
            "accuracy_when_one_missed_alone": float(correct[~both_ok].mean()) if (~both_ok).any() else None,
            "independent_errors_bound": float(alone_ok.mean() ** 2),
        }
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    sys.exit(run_script(main))
