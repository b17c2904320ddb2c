"""Where does a MultiMNIST model's error come from? Overlap-pair error split four ways.

A model trained with `capsctl train --compose overlap` is scored on the overlap pairs of test digits
that `capsctl eval-pairs --layout overlap` scores (pairing seed 0), and each pair's outcome is set
beside:

- *each digit alone*: the same canvas with only that digit, at its place in the pair. A pair both of
  whose digits the model misses alone fails for the base digit, not for the overlap;
- *how much the digits overlap*: the share of the fainter digit's ink (pixels > 0.5) that the other
  digit's ink covers, in bins;
- *the class pair*: the pairs with the most errors;
- *composites seen*: the run's per-epoch test accuracy (metrics.jsonl beside the model), and any other
  runs given with --runs, as error against the number of composites each had trained on.

    python tools/multimnist_errors.py RUN/model.safetensors [--runs RUN2 RUN3 ...] [--json OUT.json]
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import Counter
from pathlib import Path

import numpy as np

from capsctl._io import atomic_write_bytes
from capsctl._script_args import add_backend, add_data, add_model, check_json_out, test_images
from capsctl.backend import get_backend
from capsctl.data.composites import OVERLAP_SHIFT, alone, make_composites, overlay, set_matches
from capsctl.errors import CapsctlError, run_script
from capsctl.model.fit import check_fit
from capsctl.model.weights import load_model

INK = 0.5  # a pixel is ink above this (pixels in 0..1)
OVERLAP_BINS = (0.0, 0.1, 0.2, 0.3, 0.4, 1.01)  # share of the fainter digit's ink under the other's


def overlap_share(parts: np.ndarray, offsets: np.ndarray) -> np.ndarray:
    """(M,): of the digit with less ink, the share of its ink pixels that the other digit's ink covers."""
    ink = overlay(parts[:, :1], offsets[:, :1]) > INK, overlay(parts[:, 1:], offsets[:, 1:]) > INK
    both = (ink[0] & ink[1]).reshape(len(parts), -1).sum(axis=1)
    least = np.minimum(ink[0].reshape(len(parts), -1).sum(axis=1), ink[1].reshape(len(parts), -1).sum(axis=1))
    return both / np.maximum(least, 1)


def learning_curve(run: Path) -> list[dict[str, float]]:
    """Per epoch of a --compose run: composites trained on so far (images/s x seconds of each epoch, one
    composite per training image) and the error on that epoch's test pairs."""
    if not (run / "metrics.jsonl").is_file():
        return []  # (a model file outside its run folder: no curve to read)
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]
    # (a run on single digits scored single digits: its test accuracy is not a pair error)
    rows = [r for r in rows if r.get("compose") == "overlap" and r.get("test_accuracy") is not None]
    out = []
    seen = 0
    for row in rows:
        seen += round(row["images_per_s"] * row["seconds"])
        out.append(
            {
                "epoch": row["epoch"],
                "composites": seen,
                "error": 1 - row["test_accuracy"],
                "test_pairs": row["test_images"],
            }
        )
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_model(ap)
    add_backend(ap)
    add_data(ap)
    ap.add_argument("--runs", nargs="*", default=[], help="other --compose run folders for the curve")
    ap.add_argument("--json", help="write the report here too")
    args = ap.parse_args()
    for run in args.runs:  # (the model's own folder may have no curve; a folder named here must)
        if not (Path(run) / "metrics.jsonl").is_file():
            raise CapsctlError(f"--runs {run}: no metrics.jsonl there (not a run folder)")
        if not learning_curve(Path(run)):
            raise CapsctlError(f"--runs {run}: not a --compose overlap run (no epoch scored on pairs)")
    check_json_out(args.json)  # said before the long scoring, not after it

    test = test_images(args)
    spec, weights = load_model(args.model)
    runner = get_backend(args.backend).runner(spec, weights)

    # the pairs eval-pairs --layout overlap scores, with each digit's place in the canvas
    light = spec.background == "light"  # (dark ink on light: merged on white, as eval-pairs does)
    comp = make_composites(test.images, test.labels, digits=2, layout="overlap", seed=0, light=light)
    check_fit(spec, comp.images, comp.labels, str(args.model), "overlap pairs of the test images")
    assert comp.indices is not None and comp.offsets is not None
    n = len(test.images)
    ink_images = 1 - test.images if light else test.images
    parts, offsets = ink_images[comp.indices], comp.offsets  # (the ink, for where the digits overlap)

    correct, confident = set_matches(runner.scores(comp.images), comp.labels)
    alone_ok = np.stack(  # each digit with nothing else on its canvas, at its place
        [
            np.argmax(runner.scores(alone(comp, j, test.images, in_canvas=True).images), axis=1)
            == comp.labels[:, j]
            for j in range(2)
        ],
        axis=1,
    )
    centred = overlay(test.images[:, None], np.full((n, 1, 2), OVERLAP_SHIFT), light)
    single = float((np.argmax(runner.scores(centred), axis=1) == test.labels).mean())

    missed_alone = (~alone_ok).sum(axis=1)
    by_missed = {
        str(k): {
            "pairs": int((missed_alone == k).sum()),
            "error": float(1 - correct[missed_alone == k].mean()) if (missed_alone == k).any() else None,
            "share_of_all_errors": float((~correct & (missed_alone == k)).sum() / max((~correct).sum(), 1)),
        }
        for k in range(3)
    }
    share = overlap_share(parts, offsets)
    bins = np.digitize(share, OVERLAP_BINS[1:-1])
    by_overlap = [
        {
            "overlap": f"{OVERLAP_BINS[b]:.0%}–{min(OVERLAP_BINS[b + 1], 1.0):.0%}",
            "pairs": int((bins == b).sum()),
            "error": float(1 - correct[bins == b].mean()) if (bins == b).any() else None,
        }
        for b in range(len(OVERLAP_BINS) - 1)
    ]
    errors = Counter(tuple(sorted(map(int, p))) for p in comp.labels[~correct])
    totals = Counter(tuple(sorted(map(int, p))) for p in comp.labels)
    worst = [
        {"pair": f"{a}+{b}", "errors": e, "pairs": totals[(a, b)], "error": e / totals[(a, b)]}
        for (a, b), e in errors.most_common(8)
    ]
    report = {
        "model": args.model,
        "pairs": len(correct),
        "error": float(1 - correct.mean()),
        "confident_error": float(1 - confident.mean()),
        "single_digit_error_centred_in_canvas": 1 - single,
        "digit_alone_error_at_its_place": float(1 - alone_ok.mean()),
        "independent_errors_bound": float(1 - alone_ok.mean(axis=0).prod()),
        "by_digits_missed_alone": by_missed,
        "by_overlap": by_overlap,
        "worst_class_pairs": worst,
        "curve": {str(r): learning_curve(Path(r)) for r in [str(Path(args.model).parent), *args.runs]},
    }
    text = json.dumps(report, indent=1)
    print(text)
    if args.json:
        atomic_write_bytes(Path(args.json), (text + "\n").encode())


if __name__ == "__main__":
    sys.exit(run_script(main))
