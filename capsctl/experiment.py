"""Experiments: train heads over seeds and variants, score them on every test, write results.

Backend-neutral orchestration over `capsctl.training.train` and a backend's runner. Each model
trains in its own run folder under OUT/runs/, so a second invocation skips finished models and
resumes unfinished ones. Scores are cached per run folder (eval.json, keyed on the model file),
so regenerating tables never retrains or rescores. numpy and matplotlib are imported lazily by
the callers' needs; this module imports numpy only inside functions that need it.
"""

from __future__ import annotations

import json
import math
import os
import platform
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from ._atomic import atomic_write_bytes
from .errors import CapsctlError

RESULTS_FORMAT = "capsctl-results/1"
# Per-epoch curves use the first N test images: the full test set is scored once at the end,
# and scoring 10k images every epoch would cost a third of the training time on a small CPU.
CURVE_TEST_IMAGES = 2000
COMPOSITE_SEED = 0  # the pairing contract's default seed; never tuned on
# test name -> (layout, digits); "test" is the standard single-digit test set
COMPOSITE_TESTS: dict[str, tuple[str, int]] = {
    "vertical": ("vertical", 2),
    "horizontal": ("horizontal", 2),
    "vertical3": ("vertical", 3),
    "overlap": ("overlap", 2),
}
ALL_TESTS = ("test", *COMPOSITE_TESTS)
HEADS = ("capsule", "pool")
ROUTINGS = ("su", "su-unit", "sabour")
SQUASHES = ("su", "sabour")
EVAL_FILE = "eval.json"


# -- option parsing ---------------------------------------------------------------------

def parse_ints(text: str, option: str, lo: int = 0, hi: int = 1 << 30) -> list[int]:
    """'0,1,2' -> [0, 1, 2]; also accepts ranges like '1-8'."""
    values: list[int] = []
    for part in (p.strip() for p in text.split(",")):
        if not part:
            continue
        try:
            if "-" in part[1:]:
                a, b = part.split("-", 1)
                values.extend(range(int(a), int(b) + 1))
            else:
                values.append(int(part))
        except ValueError:
            raise CapsctlError(f"{option}: expected comma-separated integers, got {text!r}") from None
    if not values:
        raise CapsctlError(f"{option}: no values given")
    for v in values:
        if not lo <= v <= hi:
            raise CapsctlError(f"{option}: {v} is outside {lo}..{hi}")
    return list(dict.fromkeys(values))


def parse_names(text: str, option: str, allowed: Sequence[str]) -> list[str]:
    names = [p.strip() for p in text.split(",") if p.strip()]
    if not names:
        raise CapsctlError(f"{option}: no values given")
    for n in names:
        if n not in allowed:
            raise CapsctlError(f"{option}: unknown value {n!r} (known: {', '.join(allowed)})")
    return list(dict.fromkeys(names))


# -- what one model is ------------------------------------------------------------------

@dataclass(frozen=True)
class Overrides:
    """Changes to the recipe or the capsule spec, for recipe-choice comparisons; None = recipe's."""

    epochs: int | None = None
    lr: float | None = None
    schedule: str | None = None
    shift: int | None = None
    scale: float | None = None
    weight_decay: float | None = None
    routing: str | None = None
    squash: str | None = None
    routings: int | None = None

    def tag(self) -> str:
        """A short, stable folder-name suffix naming the changes ('' for none)."""
        parts = []
        for key, value in asdict(self).items():
            if value is None or key == "epochs":
                continue
            short = {"weight_decay": "wd", "schedule": "", "routing": "", "squash": "sq", "routings": "r"}.get(key, key)
            parts.append(f"{short}{value:g}" if isinstance(value, float) else f"{short}{value}")
        return "-".join(parts)

    def active(self) -> dict[str, Any]:
        return {k: v for k, v in asdict(self).items() if v is not None}


@dataclass(frozen=True)
class Job:
    head: str
    seed: int
    spec: Any  # ModelSpec
    config: Any  # TrainConfig
    run: Path


def make_job(
    out: Path, backend: str, dataset: str, recipe: str, head: str, seed: int, limit: int | None,
    ov: Overrides, name: str | None = None, holdout: int | None = None,
) -> Job:
    from .recipes import get_recipe
    from .spec import ModelSpec
    from .training import TrainConfig

    rec = get_recipe(recipe)
    spec = ModelSpec(head=head)
    if head == "capsule":
        caps = {k: v for k, v in (("routing", ov.routing), ("squash", ov.squash), ("routings", ov.routings)) if v is not None}
        if caps:
            spec = spec.with_capsule(**caps)
    settings = rec.settings(head, epochs=ov.epochs, lr=ov.lr, schedule=ov.schedule, shift=ov.shift, scale=ov.scale,
                            weight_decay=ov.weight_decay)
    cfg = TrainConfig(backend=backend, dataset=dataset, seed=seed, limit=limit, recipe=recipe, **settings)
    if name is None:
        tag = ov.tag()
        name = f"{backend}-{recipe}-{head}{'-' + tag if tag else ''}{f'-holdout{holdout}' if holdout else ''}-s{seed}"
    return Job(head, seed, spec, cfg, out / "runs" / name)


# -- training with skip / resume --------------------------------------------------------

def run_state(job: Job) -> str:
    """'done' (model + a metrics row for every epoch), 'partial' (a checkpoint to resume) or 'new'."""
    from .training import CHECKPOINT_FILE, MODEL_FILE, load_checkpoint, read_metrics

    run = job.run
    if (run / CHECKPOINT_FILE).exists():
        ck = load_checkpoint(run)
        mine, theirs = asdict(job.config), asdict(ck.config)
        diff = [k for k in mine if k != "backend" and mine[k] != theirs.get(k)]
        if diff or ck.spec != job.spec:
            what = diff[0] if diff else "model spec"
            raise CapsctlError(f"{run}: holds a run with another {what} ({theirs.get(what, '')!s}); use another --out")
    epochs = {r.get("epoch") for r in read_metrics(run)}
    if (run / MODEL_FILE).exists() and set(range(1, job.config.epochs + 1)) <= epochs:
        return "done"
    return "partial" if (run / CHECKPOINT_FILE).exists() else "new"


Hook = Callable[[str, dict[str, Any]], None]


def ensure_trained(backend: Any, job: Job, train_split: Any, curve_split: Any, hook: Hook | None = None) -> str:
    """Train `job` unless finished; returns what happened: 'skipped', 'resumed' or 'trained'."""
    from .training import train

    state = run_state(job)
    if state == "done":
        return "skipped"
    resume = state == "partial"
    train(backend, job.spec, job.config, train_split, curve_split, job.run, resume=resume, show_progress=False, on_step=hook)
    return "resumed" if resume else "trained"


# -- scoring ----------------------------------------------------------------------------

def model_key(path: Path) -> str:
    """The model file's SHA-256: cached scores follow the weights, even through a copy."""
    import hashlib

    return hashlib.sha256(path.read_bytes()).hexdigest()


@dataclass
class Scorer:
    """Scores models on the standard test and composites, building each composite set once."""

    test: Any  # Split
    eval_limit: int | None = None
    _sets: dict[str, Any] = field(default_factory=dict)

    def data(self, name: str) -> tuple[Any, Any]:
        if name not in self._sets:
            from .composites import make_composites

            if name == "test":
                x, y = self.test.images, self.test.labels[:, None]
                if self.eval_limit:
                    x, y = x[: self.eval_limit], y[: self.eval_limit]
            else:
                layout, digits = COMPOSITE_TESTS[name]
                c = make_composites(self.test.images, self.test.labels, digits=digits, layout=layout,
                                    seed=COMPOSITE_SEED, limit=self.eval_limit)
                x, y = c.images, c.labels
            self._sets[name] = (x, y)
        return self._sets[name]

    def score(self, backend: Any, run: Path, tests: Sequence[str], routings: int | None = None) -> dict[str, dict[str, Any]]:
        """{test: {n, accuracy, confident_accuracy, seconds}} for the model in `run`, cached in run/eval.json."""
        from .composites import score_sets
        from .training import MODEL_FILE
        from .weights import load_model

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
                entries[ek] = {"n": r["pairs"], "accuracy": r["accuracy"], "confident_accuracy": r["confident_accuracy"],
                               "seconds": time.perf_counter() - t0}
                cache["model"] = key
                atomic_write_bytes(cache_path, json.dumps(cache, indent=1).encode())
            results[name] = entries[ek]
        return results


# -- summaries --------------------------------------------------------------------------

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
            entry["tests"][t] = {"n": ms[0]["tests"][t]["n"], "accuracy": mean_std(acc), "confident_accuracy": mean_std(conf)}
        out[head] = entry
    return out


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine() -> dict[str, Any]:
    load = os.getloadavg() if hasattr(os, "getloadavg") else (math.nan,) * 3
    return {"cpu": cpu_name(), "cores": os.cpu_count(), "python": platform.python_version(),
            "loadavg": [round(x, 2) for x in load]}


# -- progress ---------------------------------------------------------------------------

@contextmanager
def progress_for(show: bool) -> Iterator[Any]:
    """One bar for the whole experiment and one for the model being trained."""
    from rich.progress import TextColumn

    from ._console import progress

    bar = progress(TextColumn("{task.fields[note]}"))
    bar.disable = not show
    with bar:
        yield bar


class Tracker:
    """Turns training hooks into progress-bar updates (overall steps and the current model's)."""

    def __init__(self, bar: Any, total_steps: int) -> None:
        self.bar = bar
        self.all = bar.add_task("experiment", total=max(total_steps, 1), note="")
        self.model: Any = None
        self.steps_per_epoch = 1

    def start(self, label: str, job: Job, n_train: int, done_steps: int) -> None:
        from .training import steps_per_epoch

        self.steps_per_epoch = steps_per_epoch(job.config, n_train)
        total = self.steps_per_epoch * job.config.epochs
        if self.model is not None:
            self.bar.remove_task(self.model)
        self.model = self.bar.add_task(label, total=total, completed=min(done_steps, total), note="")
        self.label = label

    def hook(self, kind: str, info: dict[str, Any]) -> None:
        if kind == "step":
            self.bar.advance(self.model)
            self.bar.advance(self.all)
        else:
            acc = info.get("test_accuracy")
            note = f"epoch {info['epoch']}  loss {info['loss']:.4f}" + (f"  curve-test {acc:.2%}" if acc is not None else "")
            self.bar.update(self.model, note=note)

    def skip(self, steps: int) -> None:
        self.bar.advance(self.all, steps)


def steps_done(job: Job, n_train: int) -> int:
    from .training import CHECKPOINT_FILE, load_checkpoint, steps_per_epoch

    if not (job.run / CHECKPOINT_FILE).exists():
        return 0
    ck = load_checkpoint(job.run)
    return ck.epoch * steps_per_epoch(job.config, n_train) + ck.step


def train_and_score(
    backend: Any, jobs: Sequence[Job], train_split: Any, test_split: Any, scorer: Scorer, tests: Sequence[str],
    show_progress: bool, eval_routings: Callable[[Job], Sequence[int | None]] | None = None,
    train: bool = True,
) -> list[dict[str, Any]]:
    """Train (or skip / resume) every job, then score it; returns one record per job.

    With `train=False` only finished models are scored; the others are left out (and named).
    """
    from ._console import err
    from .datasets import Split
    from .training import read_metrics, steps_per_epoch
    from .weights import parameter_count

    limit = jobs[0].config.limit if jobs else None
    n_train = len(train_split.images) if limit is None else min(len(train_split.images), limit)
    n_curve = min(CURVE_TEST_IMAGES, scorer.eval_limit or CURVE_TEST_IMAGES)
    curve = Split(test_split.images[:n_curve], test_split.labels[:n_curve])
    total = sum(steps_per_epoch(j.config, n_train) * j.config.epochs for j in jobs)
    records = []
    with progress_for(show_progress) as bar:
        tracker = Tracker(bar, total)
        for i, job in enumerate(jobs, 1):
            label = f"[{i}/{len(jobs)}] {job.run.name}"
            done = steps_done(job, n_train)
            if not train and run_state(job) != "done":
                err.print(f"{label}: not finished; left out (--no-train)")
                tracker.skip(steps_per_epoch(job.config, n_train) * job.config.epochs)
                continue
            tracker.start(label, job, n_train, done)
            tracker.skip(done)
            status = ensure_trained(backend, job, train_split, curve, tracker.hook)
            if status == "skipped":
                tracker.skip(steps_per_epoch(job.config, n_train) * job.config.epochs - done)
            rows = read_metrics(job.run)[: job.config.epochs]
            bar.update(tracker.model, note="scoring")
            scores = scorer.score(backend, job.run, tests)
            extra = {}
            if eval_routings is not None:
                extra["eval_at"] = {str(r): scorer.score(backend, job.run, tests, routings=r) for r in eval_routings(job) if r}
            # the seconds each score took when it was computed (cached scores keep their cost)
            score_seconds = sum(t["seconds"] for t in scores.values())
            score_seconds += sum(t["seconds"] for at in extra.get("eval_at", {}).values() for t in at.values())
            train_seconds = sum(r["seconds"] for r in rows)
            records.append({
                "head": job.head,
                "seed": job.seed,
                "run": str(job.run),
                "status": status,
                "spec": job.spec.to_dict(),
                "config": asdict(job.config),
                "parameters": parameter_count(job.spec),
                "epochs": job.config.epochs,
                "train_seconds": train_seconds,
                "images_per_s": sum(r["images_per_s"] for r in rows) / max(len(rows), 1),
                "score_seconds": score_seconds,
                "curve": [{k: r.get(k) for k in ("epoch", "loss", "train_accuracy", "test_accuracy", "lr")} for r in rows],
                "tests": scores,
                **extra,
            })
            summary = "  ".join(f"{t} {scores[t]['accuracy']:.2%}/{scores[t]['confident_accuracy']:.2%}" for t in tests)
            err.print(f"{label}: {status}; {summary}")
            bar.update(tracker.model, note="done")
    return records


# -- the two experiments ----------------------------------------------------------------

@dataclass(frozen=True)
class PairsPlan:
    backend: str
    dataset: str
    data_dir: str | None
    recipe: str
    seeds: tuple[int, ...]
    heads: tuple[str, ...] = HEADS
    limit: int | None = None
    eval_limit: int | None = None
    tests: tuple[str, ...] = ALL_TESTS
    overrides: Overrides = Overrides()
    holdout: int | None = None  # score on N held-out training images (recipe choice), not the test set
    command: str = ""
    train: bool = True  # False: score and tabulate finished models only


def _prepare(backend_name: str, dataset: str, data_dir: str | None, out: Path) -> tuple[Any, Any, Any]:
    """The backend, the train and test splits, and the output folder: what every experiment starts from."""
    from . import datasets
    from .backends import get_backend

    backend = get_backend(backend_name)
    ds = datasets.load(dataset, data_dir)
    train_split, test_split = ds.train(), ds.test()  # refuse broken data before creating anything
    out.mkdir(parents=True, exist_ok=True)
    return backend, train_split, test_split


def _finish(
    results: dict[str, Any], models: list[dict[str, Any]], out: Path, t0: float, start_machine: dict[str, Any]
) -> dict[str, Any]:
    """Add the cost and machine fields every results.json carries, and write it."""
    results.update({
        "compute_seconds": sum(m["train_seconds"] + m["score_seconds"] for m in models),
        "wall_seconds": time.time() - t0,
        "machine": {**start_machine, "loadavg_end": machine()["loadavg"]},
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    })
    write_results(out, results)
    return results


def run_pairs(plan: PairsPlan, out: Path, show_progress: bool = True) -> dict[str, Any]:
    t0 = time.time()
    start_machine = machine()
    backend, train_split, test_split = _prepare(plan.backend, plan.dataset, plan.data_dir, out)
    if plan.holdout:
        from .datasets import hold_out

        # the official test set is not touched: choices made on these scores stay honest
        train_split, test_split = hold_out(train_split, plan.holdout)
    jobs = [make_job(out, plan.backend, plan.dataset, plan.recipe, h, s, plan.limit, plan.overrides, holdout=plan.holdout)
            for s in plan.seeds for h in plan.heads]
    scorer = Scorer(test_split, plan.eval_limit)
    models = train_and_score(backend, jobs, train_split, test_split, scorer, plan.tests, show_progress, train=plan.train)
    if not models:
        raise CapsctlError(f"--out {out}: no finished model to report (--no-train)")
    finished = {m["run"] for m in models}
    missing = [os.path.relpath(j.run, out) for j in jobs if str(j.run) not in finished]
    for m in models:
        m["run"] = os.path.relpath(m["run"], out)
    results = {
        "format": RESULTS_FORMAT,
        "kind": "pairs",
        "command": plan.command,
        "backend": plan.backend,
        "backend_info": backend.describe(),
        "dataset": plan.dataset,
        "train_images": len(train_split.images) if plan.limit is None else min(plan.limit, len(train_split.images)),
        "test_images": len(test_split.images),
        "recipe": plan.recipe,
        "overrides": plan.overrides.active(),
        "holdout": plan.holdout,
        "seeds": list(plan.seeds),
        "heads": list(plan.heads),
        "limit": plan.limit,
        "eval_limit": plan.eval_limit,
        "composite_seed": COMPOSITE_SEED,
        "curve_test_images": min(CURVE_TEST_IMAGES, plan.eval_limit or CURVE_TEST_IMAGES),
        "tests": list(plan.tests),
        "models": models,
        "missing": missing,
        "summary": summarize(models, plan.tests),
    }
    return _finish(results, models, out, t0, start_machine)


@dataclass(frozen=True)
class AblatePlan:
    backend: str
    dataset: str
    data_dir: str | None
    recipe: str
    seed: int
    routings: tuple[str, ...] = ROUTINGS
    squashes: tuple[str, ...] = SQUASHES
    iterations: tuple[int, ...] = (1, 2, 3, 5, 8)
    eval_iterations: tuple[int, ...] = (1, 2, 3, 4, 5, 6, 7, 8)
    base_iterations: int = 3  # the model evaluated at every eval_iterations count
    epochs: int | None = None
    shift: int | None = None  # None = the recipe's
    limit: int | None = None
    eval_limit: int | None = None
    tests: tuple[str, ...] = ("test", "vertical", "horizontal")
    command: str = ""


def run_ablate(plan: AblatePlan, out: Path, show_progress: bool = True) -> dict[str, Any]:
    t0 = time.time()
    start_machine = machine()
    backend, train_split, test_split = _prepare(plan.backend, plan.dataset, plan.data_dir, out)
    counts = sorted(set(plan.iterations) | {plan.base_iterations})
    jobs = []
    for routing in plan.routings:
        for squash in plan.squashes:
            for r in counts:
                ov = Overrides(epochs=plan.epochs, shift=plan.shift, routing=routing, squash=squash, routings=r)
                name = f"{plan.backend}-{plan.recipe}-capsule-{routing}-{squash}-r{r}-s{plan.seed}"
                jobs.append(make_job(out, plan.backend, plan.dataset, plan.recipe, "capsule", plan.seed, plan.limit, ov, name))
    scorer = Scorer(test_split, plan.eval_limit)

    def eval_at(job: Job) -> Sequence[int | None]:
        return plan.eval_iterations if job.spec.capsule.routings == plan.base_iterations else ()

    models = train_and_score(backend, jobs, train_split, test_split, scorer, plan.tests, show_progress, eval_at)
    variants = []
    for routing in plan.routings:
        for squash in plan.squashes:
            mine = [m for m in models if m["spec"]["capsule"]["routing"] == routing and m["spec"]["capsule"]["squash"] == squash]
            base = next(m for m in mine if m["spec"]["capsule"]["routings"] == plan.base_iterations)
            variants.append({
                "routing": routing,
                "squash": squash,
                "trained": [{"routings": m["spec"]["capsule"]["routings"], "run": os.path.relpath(m["run"], out),
                             "tests": m["tests"], "train_seconds": m["train_seconds"], "curve": m["curve"]}
                            for m in mine if m["spec"]["capsule"]["routings"] in plan.iterations],
                "evaluated": [{"routings": int(r), "tests": t} for r, t in base["eval_at"].items()],
            })
    results = {
        "format": RESULTS_FORMAT,
        "kind": "ablate",
        "command": plan.command,
        "backend": plan.backend,
        "backend_info": backend.describe(),
        "dataset": plan.dataset,
        "train_images": len(train_split.images) if plan.limit is None else min(plan.limit, len(train_split.images)),
        "recipe": plan.recipe,
        "seed": plan.seed,
        "epochs": jobs[0].config.epochs,
        "shift": jobs[0].config.shift,
        "limit": plan.limit,
        "eval_limit": plan.eval_limit,
        "composite_seed": COMPOSITE_SEED,
        "base_iterations": plan.base_iterations,
        "iterations": list(plan.iterations),
        "eval_iterations": list(plan.eval_iterations),
        "tests": list(plan.tests),
        "variants": variants,
    }
    return _finish(results, models, out, t0, start_machine)


# -- outputs ----------------------------------------------------------------------------

def write_results(out: Path, results: dict[str, Any]) -> None:
    """results.json, results.md and the PNG plots, each written atomically."""
    from . import _plots, _tables

    atomic_write_bytes(out / "results.json", (json.dumps(results, indent=1) + "\n").encode())
    if results["kind"] == "pairs":
        md = _tables.pairs_markdown(results)
        plots = _plots.pairs_plots(results, out)
    else:
        md = _tables.ablate_markdown(results)
        plots = _plots.ablate_plots(results, out)
    links = "".join(f"\n![{p.stem}]({p.name})\n" for p in plots)
    atomic_write_bytes(out / "results.md", (md + links).encode())


def load_results(folder: Path) -> dict[str, Any]:
    path = folder / "results.json"
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise CapsctlError(f"{path}: not found (run `capsctl experiment pairs/ablate --out {folder}` first)") from None
    except (OSError, json.JSONDecodeError) as e:
        raise CapsctlError(f"{path}: unreadable ({e})") from None
    if not isinstance(data, dict) or data.get("format") != RESULTS_FORMAT:
        raise CapsctlError(f"{path}: not a capsctl results file")
    return data
