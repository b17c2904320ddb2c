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
from capsctl.data.composites import make_composites, score_sets
from capsctl.data.datasets import Split
from capsctl.experiment.plan import COMPOSITE_SEED, COMPOSITE_TESTS
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
    _sets: dict[str, Any] = field(default_factory=dict)

    def data(self, name: str) -> tuple[np.ndarray, np.ndarray]:
        if name not in self._sets:
            if name == "test":
                x, y = self.test.images, self.test.labels[:, None]
                if self.eval_limit:
                    x, y = x[: self.eval_limit], y[: self.eval_limit]
            else:
                layout, digits = COMPOSITE_TESTS[name]
                c = make_composites(
                    self.test.images,
                    self.test.labels,
                    digits=digits,
                    layout=layout,
                    seed=COMPOSITE_SEED,
                    limit=self.eval_limit,
                )
                x, y = c.images, c.labels
            self._sets[name] = (x, y)
        return self._sets[name]

    def score(
        self, backend: Any, run: Path, tests: Sequence[str], routings: int | None = None
    ) -> dict[str, dict[str, Any]]:
        """{test: {n, accuracy, confident_accuracy, seconds}} for the model in `run`, cached in
        run/eval.json."""

        model = run / MODEL_FILE
        cache_path = run / EVAL_FILE
        key = model_key(model)
        cache: dict[str, Any] = {}
        if cache_path.exists():
            try:
                cache = json.loads(cache_path.read_text())
            except (json.JSONDecodeError, OSError):
                cache = {}
            if cache.get("model") != key:
                cache = {}
        entries = cache.setdefault("scores", {})
        results: dict[str, dict[str, Any]] = {}
        runner = None
        for name in tests:
            ek = f"{name}|r={routings or ''}|limit={self.eval_limit or ''}|seed={COMPOSITE_SEED}"
            if ek not in entries:
                if runner is None:
                    spec, weights = load_model(model)
                    if routings is not None and spec.head == "capsule":
                        spec = spec.with_capsule(routings=routings)
                    runner = backend.runner(spec, weights)
                x, y = self.data(name)
                t0 = time.perf_counter()
                r = score_sets(runner.scores(x), y)
                entries[ek] = {
                    "n": r["pairs"],
                    "accuracy": r["accuracy"],
                    "confident_accuracy": r["confident_accuracy"],
                    "seconds": time.perf_counter() - t0,
                }
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
        out[head] = entry
    return out
