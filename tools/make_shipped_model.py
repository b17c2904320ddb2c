"""Regenerate the model that ships inside capsctl (capsctl/model/capsule-mnist5k.safetensors).

    python tools/make_shipped_model.py            # train (default recipe, seed 0, mnist-5k), score, write
    python tools/make_shipped_model.py --run RUN  # package a finished run of the same recipe and seed instead

It trains the capsule head exactly as `capsctl train` does with no options, scores it on the full test set
and on vertical and horizontal pairs (the README's headline), records a small `check` (scores of the first
test images and pairs, which tests/test_shipped.py reproduces on every backend), and writes the model with
its provenance in the file's metadata and in docs/SHIPPED-MODEL.md.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

import capsctl
from capsctl._io import atomic_write_bytes
from capsctl._script_args import add_backend
from capsctl.backend import get_backend
from capsctl.data import datasets
from capsctl.data.composites import make_composites, score_sets
from capsctl.errors import CapsctlError, run_script
from capsctl.model.shipped import PROVENANCE_KEY, SHIPPED_MODEL
from capsctl.model.spec import ModelSpec
from capsctl.model.weights import load_model, save_model
from capsctl.training.config import TrainConfig
from capsctl.training.loop import train
from capsctl.training.recipes import get_recipe
from capsctl.training.run_folder import CHECKPOINT_FILE, MODEL_FILE, load_checkpoint

ROOT = Path(__file__).resolve().parent.parent
CHECK_IMAGES = 500  # the slice tests/test_shipped.py scores on each backend
CHECK_PAIRS = 200


def _commit() -> str:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True, check=True
        )
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=ROOT,
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
        return out.stdout.strip() + ("+local changes" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def _check_same_recipe(cfg: TrainConfig, seed: int) -> None:
    """A --run must hold what the plain command would train: the default recipe's settings, that seed,
    all of mnist-5k (thread counts may still change the last bits of the weights)."""
    want = get_recipe("default").settings("capsule")
    got = {k: getattr(cfg, k) for k in want}
    problems = [f"{k} {got[k]} (want {v})" for k, v in want.items() if got[k] != v]
    if cfg.seed != seed:
        problems.append(f"seed {cfg.seed} (want {seed})")
    if cfg.dataset != "mnist-5k" or cfg.limit is not None or cfg.holdout or cfg.val_fraction:
        problems.append("not all of mnist-5k")
    if problems:
        raise CapsctlError(f"--run: not a default-recipe run: {', '.join(problems)}")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--run", type=Path, help="an existing run folder to package (default: train one)")
    add_backend(ap)
    ap.add_argument("--seed", type=int, default=0, help="training seed (default: 0)")
    args = ap.parse_args()

    ds = datasets.load("mnist-5k")
    test = ds.test()
    backend = get_backend(args.backend)
    # the command that regenerates the file; --run only saves retraining what such a run already trained
    command = "python tools/make_shipped_model.py" + (f" --seed {args.seed}" if args.seed else "")
    if args.run is None:
        tmp = Path(tempfile.mkdtemp(prefix="capsctl-shipped-"))
        run = tmp / "run"
        recipe = get_recipe("default")
        cfg = TrainConfig(
            backend=args.backend,
            dataset="mnist-5k",
            seed=args.seed,
            recipe=recipe.name,
            **recipe.settings("capsule"),
        )
        train(backend, ModelSpec(head="capsule"), cfg, ds.train(), None, run)
    else:
        run = args.run
        if not (run / CHECKPOINT_FILE).is_file():
            raise CapsctlError(f"--run {run}: no {CHECKPOINT_FILE} there (not a run folder)")
    ck = load_checkpoint(run)
    if args.run is not None:
        _check_same_recipe(ck.config, args.seed)
        if (ck.epoch, ck.step) != (ck.config.epochs, 0):  # (its model file is rewritten every epoch)
            raise CapsctlError(
                f"--run {run}: stopped at epoch {ck.epoch} of {ck.config.epochs}; finish it first "
                f"(capsctl train --resume {run})"
            )
    spec, weights = load_model(run / MODEL_FILE)
    runner = backend.runner(spec, weights)
    t0 = time.perf_counter()
    scores = runner.scores(test.images)
    test_acc = float((scores.argmax(1) == test.labels).mean())
    pairs = {}
    for layout in ("vertical", "horizontal"):
        c = make_composites(test.images, test.labels, digits=2, layout=layout, seed=0)
        r = score_sets(runner.scores(c.images), c.labels)
        pairs[layout] = {
            "n": r["pairs"],
            "accuracy": r["accuracy"],
            "confident_accuracy": r["confident_accuracy"],
        }
    c = make_composites(test.images, test.labels, digits=2, layout="vertical", seed=0, limit=CHECK_PAIRS)
    check = {
        "test_images": CHECK_IMAGES,
        "test_correct": int((scores[:CHECK_IMAGES].argmax(1) == test.labels[:CHECK_IMAGES]).sum()),
        "test_scores_sum": float(scores[:CHECK_IMAGES].astype(np.float64).sum()),
        "vertical_pairs": CHECK_PAIRS,
        "vertical_correct": round(score_sets(runner.scores(c.images), c.labels)["accuracy"] * CHECK_PAIRS),
    }
    record = {
        "command": command,
        "recipe": ck.config.recipe,
        "config": json.loads(ck.config.to_json()),
        "seed": ck.config.seed,
        "commit": _commit(),
        "dataset": "mnist-5k (embedded: 5,000 MNIST training digits; scored on the 10,000 test digits)",
        "backend": f"{args.backend} ({backend.describe()})",
        "capsctl_version": capsctl.__version__,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "test_accuracy": test_acc,
        "test_images": len(test.images),
        "pairs": pairs,
        "check": check,
        "score_seconds": time.perf_counter() - t0,
    }
    if args.run is not None:
        record["packaged_from"] = (
            f"{args.run} ({ck.config.backend}, {ck.config.epochs} epochs, seed {ck.config.seed})"
        )
    save_model(SHIPPED_MODEL, spec, weights, extra={PROVENANCE_KEY: json.dumps(record)})
    doc = ROOT / "docs" / "SHIPPED-MODEL.md"
    v, h = pairs["vertical"], pairs["horizontal"]
    atomic_write_bytes(doc, (
        "# The shipped model\n\n"
        f"`capsctl/model/{SHIPPED_MODEL.name}` ships inside the package, so `capsctl inspect image.png`, "
        "`capsctl eval-pairs` and `capsctl predict` work right after install with no model given (they say "
        "so "
        "in one line). It is the capsule head trained by the default recipe on the embedded mnist-5k set; "
        "the same record is in the file's metadata entry `provenance`.\n\n"
        "| field | value |\n|---|---|\n"
        f"| regenerate with | `{command}` |\n"
        + (f"| packaged from | `{record['packaged_from']}` |\n" if "packaged_from" in record else "")
        + f"| recipe, seed | `{record['recipe']}`, {record['seed']} |\n"
        f"| commit | `{record['commit']}` |\n"
        f"| backend (the process that scored it here) | {record['backend']} |\n"
        f"| created | {record['created']} |\n"
        f"| test accuracy (10,000) | {test_acc:.2%} |\n"
        f"| vertical pairs (accuracy / confident) | {v['accuracy']:.2%} / {v['confident_accuracy']:.2%} |\n"
        f"| horizontal pairs (accuracy / confident) | {h['accuracy']:.2%} / {h['confident_accuracy']:.2%} "
        "|\n\n"
        f"Check that tests reproduce on every backend: first {CHECK_IMAGES} test digits "
        f"{check['test_correct']} right; first {CHECK_PAIRS} vertical pairs {check['vertical_correct']} "
        "right.\n"
    ).encode())
    print(
        f"wrote {SHIPPED_MODEL} and {doc}: test {test_acc:.2%}, vertical {v['accuracy']:.2%} / "
        f"{v['confident_accuracy']:.2%}, horizontal {h['accuracy']:.2%} / {h['confident_accuracy']:.2%}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(run_script(main))
