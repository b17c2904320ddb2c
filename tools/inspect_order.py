"""How often `capsctl inspect` reads the digits of a composite in the right order.

For vertical and horizontal 2-digit composites of the test set (capsctl.composites, the
paired-digit protocol), take the composites whose top-2 set is right and count those whose
reading order from inspect's logic (capsctl.inspection) equals the placement order.
--digits 3 does the same for 3-digit composites (top-3 sets).

    python tools/inspect_order.py RUN/model.safetensors [--limit 200]

Prints one JSON object per layout and weighting; the first weighting is inspect's default.
"""

from __future__ import annotations

import argparse
import json
import sys

import numpy as np

from capsctl._script_args import add_backend, add_data, add_model, test_images
from capsctl.backend import get_backend
from capsctl.data.composites import make_composites
from capsctl.errors import CapsctlError, run_script
from capsctl.inspect.analysis import WEIGHTINGS, inspect_one
from capsctl.model.fit import check_fit
from capsctl.model.weights import load_model


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_model(ap)
    add_data(ap)
    add_backend(ap)
    ap.add_argument("--limit", type=int, default=200, help="composites to score (default: 200)")
    ap.add_argument("--seed", type=int, default=0, help="pairing seed (the contract's default: 0)")
    ap.add_argument("--batch-size", type=int, default=50, help="images per forward pass (default: 50)")
    ap.add_argument("--digits", type=int, default=2, help="digits per composite (the set is the top k)")
    args = ap.parse_args()
    for flag, value in (("--limit", args.limit), ("--batch-size", args.batch_size)):
        if value < 1:
            raise CapsctlError(f"{flag} must be at least 1, got {value}")

    spec, weights = load_model(args.model)
    runner = get_backend(args.backend).runner(spec, weights)
    test = test_images(args)
    for layout in ("vertical", "horizontal"):
        comp = make_composites(
            test.images, test.labels, digits=args.digits, layout=layout, seed=args.seed, limit=args.limit
        )
        check_fit(spec, comp.images, comp.labels, str(args.model), f"{layout} composites of the test images")
        scores, cs, ags = [], [], []
        for start in range(0, len(comp.images), args.batch_size):
            s, tr = runner.trace(comp.images[start : start + args.batch_size])
            scores.append(s)
            cs.append(tr.couplings)
            ags.append(tr.agreement)
        sc, c, a = np.concatenate(scores), np.concatenate(cs), np.concatenate(ags)
        shape = comp.images.shape[1:3]
        for weighting in WEIGHTINGS:
            set_right = order_right = 0
            for i, labels in enumerate(comp.labels):
                res = inspect_one(spec, sc[i], shape, c[i], a[i], top=args.digits, weighting=weighting)
                if sorted(res.selected) != sorted(labels.tolist()):
                    continue
                set_right += 1
                order_right += res.order == labels.tolist()
            print(
                json.dumps(
                    {
                        "layout": layout,
                        "digits": args.digits,
                        "weighting": weighting,
                        "composites": len(comp.labels),
                        "set_right": set_right,
                        "order_right": order_right,
                        "order_accuracy": round(order_right / set_right, 4) if set_right else None,
                    }
                ),
                flush=True,
            )


if __name__ == "__main__":
    sys.exit(run_script(main))
