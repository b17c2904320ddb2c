"""Scoring finished models on the standard test and composites, cached per run folder, and summaries
over seeds."""

from __future__ import annotations

import json
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from capsctl._io import atomic_write_bytes
from capsctl.data.composites import (
    Composites,
    alone,
    make_composites,
    reconstruction_errors,
    score_sets,
)
from capsctl.data.datasets import Split
from capsctl.experiment.plan import COMPOSITE_SEED, COMPOSITE_TESTS
from capsctl.model.fit import check_fit
from capsctl.model.weights import load_model
from capsctl.training.run_folder import MODEL_FILE

EVAL_FILE = "eval.json"


def model_key(path: Path) -> str:
    """The model file's SHA-256: cached scores follow the weights, even through a copy."""
    import hashlib

    return hashlib.sha256(path.read_bytes()).hexdigest()


@dataclass
class Scorer:
    """Scores models on the standard test and composites, building each composite set once."""

    test: Split
    eval_limit: int | None = None
    light: bool = False  # the digits are dark ink on light: overlap composites on a white canvas
    _sets: dict[str, Any] = field(default_factory=dict)

    def data(self, name: str) -> tuple[np.ndarray, np.ndarray]:
        c = self.composites(name)
        return c.images, c.labels

    def composites(self, name: str) -> Composites:
        """The test's images, labels and source test images (the standard test: one 'digit' each)."""
        if name not in self._sets:
            if name == "test":
                x, y = self.test.images, self.test.labels[:, None]
                if self.eval_limit:
                    x, y = x[: self.eval_limit], y[: self.eval_limit]
                c = Composites(x, y, "alone", COMPOSITE_SEED, np.arange(len(x), dtype=np.int64)[:, None])
            else:
                layout, digits = COMPOSITE_TESTS[name]
                c = make_composites(
                    self.test.images,
                    self.test.labels,
                    digits=digits,
                    layout=layout,
                    seed=COMPOSITE_SEED,
                    limit=self.eval_limit,
                    light=self.light,
                )
            self._sets[name] = c
        result: Composites = self._sets[name]
        return result

    def reconstruction(self, runner: Any, name: str, floor: np.ndarray) -> dict[str, float]:
        """The decoder's segmentation score on test `name` (as `eval-pairs --reconstruction`): mean
        squared error per pixel of each digit reconstructed from its own capsule against that digit
        alone, and the same for each digit reconstructed from its own single-digit image (the floor).

        `floor` holds each test digit's own error (NaN: not computed yet), shared by one model's tests.

        A decoder trained on overlap pairs (`train --compose overlap`) draws their canvas: it is scored on
        the overlap test only (each digit alone at its place, and the floor from that image), and {} (no
        score) is returned for the tests whose digits have no place on its canvas."""
        c = self.composites(name)
        assert c.indices is not None
        t0 = time.perf_counter()
        drawn = tuple(runner.reconstruct(c.images[:1], c.labels[:1, 0]).shape[1:])
        digit = tuple(self.test.images.shape[1:])
        if drawn != digit and (c.offsets is None or drawn != tuple(c.images.shape[1:])):
            return {}
        errors = reconstruction_errors(runner, c, self.test.images)
        if c.offsets is not None and drawn != digit:  # each digit alone at its place: per composite
            alone_mean = float(np.mean([
                reconstruction_errors(runner, alone(c, p, self.test.images, in_canvas=True), self.test.images)
                for p in range(c.labels.shape[1])
            ]))
        else:
            used = np.unique(c.indices)
            todo = used[np.isnan(floor[used])]  # each source digit once, reconstructed from its image alone
            if len(todo):
                single = Composites(
                    self.test.images[todo], self.test.labels[todo][:, None], "alone", c.seed, todo[:, None]
                )
                floor[todo] = reconstruction_errors(runner, single, self.test.images)[:, 0]
            alone_mean = float(floor[c.indices].mean())
        return {
            "reconstruction_mse": float(errors.mean()),
            "reconstruction_mse_alone": alone_mean,
            "reconstruction_seconds": time.perf_counter() - t0,
        }

    def score(
        self,
        backend: Any,
        run: Path,
        tests: Sequence[str],
        routings: int | None = None,
        reconstruction: bool = False,
    ) -> dict[str, dict[str, Any]]:
        """{test: {n, accuracy, confident_accuracy, seconds}} for the model in `run`, cached in
        run/eval.json; with `reconstruction` (a decoder model) also the reconstruction errors."""

        model = run / MODEL_FILE
        cache_path = run / EVAL_FILE
        key = model_key(model)
        cache: dict[str, Any] = {}
        if cache_path.exists():
            try:
                cache = json.loads(cache_path.read_text())
            except (json.JSONDecodeError, OSError):
                cache = {}
            if not isinstance(cache, dict) or cache.get("model") != key:  # (damaged: scored again)
                cache = {}
        entries = cache.setdefault("scores", {})
        results: dict[str, dict[str, Any]] = {}
        runner = None
        floor = np.full(len(self.test.images), np.nan)  # the decoder's error on each test digit alone
        spec = None
        for name in tests:
            ek = f"{name}|r={routings or ''}|limit={self.eval_limit or ''}|seed={COMPOSITE_SEED}"
            if self.light and name in COMPOSITE_TESTS and COMPOSITE_TESTS[name][0] == "overlap":
                ek += "|light"  # (merged on white: not the blank-paper composites an older version scored)
            redo = ek not in entries
            # (a test a decoder cannot be scored on keeps reconstruction_seconds alone: not tried again)
            if redo or (reconstruction and "reconstruction_seconds" not in entries[ek]):
                if runner is None:
                    spec, weights = load_model(model)
                    if routings is not None and spec.head == "capsule":
                        spec = spec.with_capsule(routings=routings)
                    runner = backend.runner(spec, weights)
                if redo:
                    x, y = self.data(name)
                    assert spec is not None
                    # one line, not a framework's traceback, for a finished model the data no longer fits
                    # (e.g. a folder now decoded with another channel count)
                    check_fit(spec, x, y, str(model), f"the {name} test's images")
                    t0 = time.perf_counter()
                    r = score_sets(runner.scores(x), y)
                    entries[ek] = {
                        "n": r["pairs"],
                        "accuracy": r["accuracy"],
                        "confident_accuracy": r["confident_accuracy"],
                        "seconds": time.perf_counter() - t0,
                    }
                if reconstruction:
                    redrawn = self.reconstruction(runner, name, floor)
                    entries[ek].update({"reconstruction_seconds": 0.0, **redrawn})
                cache["model"] = key
                atomic_write_bytes(cache_path, json.dumps(cache, indent=1).encode())
            results[name] = entries[ek]
        return results


def mean_std(values: Sequence[float]) -> tuple[float, float | None]:
    """Mean and sample standard deviation; the deviation is None for a single value."""
    n = len(values)
    if n == 0:
        return math.nan, None
    m = sum(values) / n
    sd = math.sqrt(sum((v - m) ** 2 for v in values) / (n - 1)) if n > 1 else None
    return m, sd


def summarize(models: Sequence[dict[str, Any]], tests: Sequence[str]) -> dict[str, Any]:
    """Per head: mean ± sample std over seeds of every test's two accuracies, and cost."""
    out: dict[str, Any] = {}
    for head in dict.fromkeys(m["head"] for m in models):
        ms = [m for m in models if m["head"] == head]
        entry: dict[str, Any] = {
            "seeds": [m["seed"] for m in ms],
            "parameters": ms[0]["parameters"],
            "epochs": ms[0]["epochs"],
            "train_seconds": mean_std([m["train_seconds"] for m in ms]),
            "images_per_s": mean_std([m["images_per_s"] for m in ms]),
            "tests": {},
        }
        for t in tests:
            acc = [m["tests"][t]["accuracy"] for m in ms]
            conf = [m["tests"][t]["confident_accuracy"] for m in ms]
            entry["tests"][t] = {
                "n": ms[0]["tests"][t]["n"],
                "accuracy": mean_std(acc),
                "confident_accuracy": mean_std(conf),
            }
            for k in ("reconstruction_mse", "reconstruction_mse_alone"):  # decoder models
                if all(k in m["tests"][t] for m in ms):
                    entry["tests"][t][k] = mean_std([m["tests"][t][k] for m in ms])
        out[head] = entry
    return out
