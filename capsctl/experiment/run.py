"""Running an experiment: train every job (skipping finished ones, resuming partial ones), score it,
write results.

Each model trains in its own run folder under OUT/runs/, so a second invocation skips finished models and
resumes unfinished ones. Scores are cached per run folder (eval.json, keyed on the model file), so
regenerating tables never retrains or rescores."""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
from rich.progress import Progress, TaskID, TextColumn

from capsctl._console import err, progress
from capsctl.backend import Backend, get_backend
from capsctl.bench.machine import machine
from capsctl.data import datasets
from capsctl.data.datasets import Split
from capsctl.data.sources import parse_image_size, splits
from capsctl.errors import CapsctlError, TrainingStopped
from capsctl.experiment.plan import (
    COMPOSITE_SEED,
    COMPOSITE_TESTS,
    CURVE_TEST_IMAGES,
    AblatePlan,
    DataFacts,
    Job,
    Overrides,
    PairsPlan,
    make_job,
)
from capsctl.experiment.results import RESULTS_FORMAT, write_results
from capsctl.experiment.scoring import Scorer, summarize
from capsctl.model.weights import parameter_count
from capsctl.training.config import steps_per_epoch
from capsctl.training.loop import train
from capsctl.training.run_folder import (
    CHECKPOINT_FILE,
    MODEL_FILE,
    load_checkpoint,
    missing_folders,
    read_metrics,
    remove_empty,
)

# TrainConfig fields that do not change the trained weights: where the data was found, which framework ran
# the steps, and how many test images the log scored (a run made by `capsctl train`, which scores its
# curve on 1,000 images, is the experiment's run when everything else agrees)
_NOT_COMPARED = ("backend", "data_dir", "eval_limit", "curve_images")


def _same_setting(key: str, mine: Any, theirs: Any) -> bool:
    if mine == theirs:
        return True
    if key in ("holdout", "val_fraction") and theirs is None:
        return True  # a run folder from before the split was recorded (its name says holdoutN)
    if key == "dataset" and isinstance(theirs, str) and mine not in datasets.DATASETS:
        return bool(Path(str(mine)).absolute() == Path(theirs).absolute())  # a path, relative or not
    if key == "image_size" and mine is not None and theirs is not None:
        try:
            return parse_image_size(mine) == parse_image_size(theirs)
        except CapsctlError:
            return False
    return False


def run_state(job: Job) -> str:
    """'done' (model + a metrics row for every epoch), 'partial' (a checkpoint to resume) or 'new'.

    A run folder holding a run with other settings (those that shape the weights) is refused."""

    run = job.run
    if (run / CHECKPOINT_FILE).exists():
        ck = load_checkpoint(run)
        mine, theirs = asdict(job.config), asdict(ck.config)
        diff = [k for k in mine if k not in _NOT_COMPARED and not _same_setting(k, mine[k], theirs.get(k))]
        if diff or ck.spec != job.spec:
            what = diff[0] if diff else "model spec"
            raise CapsctlError(
                f"{run}: holds a run with another {what} ({theirs.get(what, '')!s}); use another --out"
            )
    epochs = {r.get("epoch") for r in read_metrics(run)}
    if (run / MODEL_FILE).exists() and set(range(1, job.config.epochs + 1)) <= epochs:
        if not (run / CHECKPOINT_FILE).exists():
            _check_without_checkpoint(job)
        return "done"
    return "partial" if (run / CHECKPOINT_FILE).exists() else "new"


def _check_without_checkpoint(job: Job) -> None:
    """A finished run whose checkpoint was deleted (to save space: with Adam's slots it is three times the
    model) still has its model's spec to compare; its training settings are taken on trust, and said so."""
    from capsctl.model.weights import load_model

    spec, _ = load_model(job.run / MODEL_FILE)
    if spec != job.spec:
        raise CapsctlError(f"{job.run}: holds a model with another model spec; use another --out")
    err.print(
        f"note: {job.run}: no {CHECKPOINT_FILE}, so only its model spec was checked against this "
        "experiment's; its training settings are taken to be the ones asked for",
        markup=False,
        highlight=False,
        soft_wrap=True,
    )


Hook = Callable[[str, dict[str, Any]], None]


def ensure_trained(
    backend: Backend,
    job: Job,
    train_split: Split,
    curve_split: Split,
    hook: Hook | None = None,
    state: str | None = None,
) -> str:
    """Train `job` unless finished; returns what happened: 'skipped', 'resumed' or 'trained'. `state`:
    its run_state, where the caller has it already (checked once: its notes are said once)."""

    state = state or run_state(job)
    if state == "done":
        return "skipped"
    resume = state == "partial"
    train(
        backend,
        job.spec,
        job.config,
        train_split,
        curve_split,
        job.run,
        resume=resume,
        show_progress=False,
        on_step=hook,
    )
    return "resumed" if resume else "trained"


@contextmanager
def progress_for(show: bool) -> Iterator[Progress]:
    """One bar for the whole experiment and one for the model being trained."""

    bar = progress(TextColumn("{task.fields[note]}"))
    bar.disable = not show
    with bar:
        yield bar


class Tracker:
    """Turns training hooks into progress-bar updates (overall steps and the current model's)."""

    def __init__(self, bar: Progress, total_steps: int) -> None:
        self.bar = bar
        self.all = bar.add_task("experiment", total=max(total_steps, 1), note="")
        self.model: TaskID = bar.add_task("", total=1, note="", visible=False)  # the model being trained
        self.steps_per_epoch = 1

    def start(self, label: str, job: Job, n_train: int, done_steps: int) -> None:
        self.steps_per_epoch = steps_per_epoch(job.config, n_train)
        total = self.steps_per_epoch * job.config.epochs
        self.bar.reset(
            self.model,
            total=total,
            completed=min(done_steps, total),
            description=label,
            note="",
            visible=True,
        )
        self.label = label

    def hook(self, kind: str, info: dict[str, Any]) -> None:
        if kind == "step":
            self.bar.advance(self.model)
            self.bar.advance(self.all)
        else:
            acc = info.get("test_accuracy")
            note = f"epoch {info['epoch']}  loss {info['loss']:.4f}" + (
                f"  curve-test {acc:.2%}" if acc is not None else ""
            )
            self.bar.update(self.model, note=note)

    def skip(self, steps: int) -> None:
        self.bar.advance(self.all, steps)


def steps_done(job: Job, n_train: int) -> int:
    if not (job.run / CHECKPOINT_FILE).exists():
        return 0
    ck = load_checkpoint(job.run)
    return ck.epoch * steps_per_epoch(job.config, n_train) + ck.step


def train_and_score(
    backend: Backend,
    jobs: Sequence[Job],
    train_split: Split,
    test_split: Split,
    scorer: Scorer,
    tests: Sequence[str],
    show_progress: bool,
    eval_routings: Callable[[Job], Sequence[int | None]] | None = None,
    train: bool = True,
) -> list[dict[str, Any]]:
    """Train (or skip / resume) every job, then score it; returns one record per job.

    With `train=False` only finished models are scored; the others are left out (and named).
    """

    limit = jobs[0].config.limit if jobs else None
    n_train = len(train_split.images) if limit is None else min(len(train_split.images), limit)
    n_curve = min(CURVE_TEST_IMAGES, scorer.eval_limit or CURVE_TEST_IMAGES)
    curve = Split(test_split.images[:n_curve], test_split.labels[:n_curve])
    total = sum(steps_per_epoch(j.config, n_train) * j.config.epochs for j in jobs)
    records = []
    left_out = []  # (said once the models that are there are scored: with none, the caller's error alone)
    with progress_for(show_progress) as bar:
        tracker = Tracker(bar, total)
        for i, job in enumerate(jobs, 1):
            label = f"[{i}/{len(jobs)}] {job.run.name}"
            done = steps_done(job, n_train)
            state = run_state(job)
            if not train and state != "done":
                left_out.append(f"{label}: not finished; left out (--no-train)")
                tracker.skip(steps_per_epoch(job.config, n_train) * job.config.epochs)
                continue
            tracker.start(label, job, n_train, done)
            tracker.skip(done)
            status = ensure_trained(backend, job, train_split, curve, tracker.hook, state=state)
            if status == "skipped":
                tracker.skip(steps_per_epoch(job.config, n_train) * job.config.epochs - done)
            rows = read_metrics(job.run)[: job.config.epochs]
            bar.update(tracker.model, note="scoring")
            scores = scorer.score(backend, job.run, tests, reconstruction=job.spec.decoder is not None)
            extra = {}
            if eval_routings is not None:
                extra["eval_at"] = {
                    str(r): scorer.score(backend, job.run, tests, routings=r) for r in eval_routings(job) if r
                }
            # the seconds each score took when it was computed (cached scores keep their cost)
            score_seconds = sum(t["seconds"] + t.get("reconstruction_seconds", 0.0) for t in scores.values())
            score_seconds += sum(
                t["seconds"] for at in extra.get("eval_at", {}).values() for t in at.values()
            )
            train_seconds = sum(r["seconds"] for r in rows)
            records.append(
                {
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
                    "curve": [
                        {k: r.get(k) for k in ("epoch", "loss", "train_accuracy", "test_accuracy", "lr")}
                        for r in rows
                    ],
                    "tests": scores,
                    **extra,
                }
            )
            summary = "  ".join(
                f"{t} {scores[t]['accuracy']:.2%}/{scores[t]['confident_accuracy']:.2%}" for t in tests
            )
            err.print(f"{label}: {status}; {summary}")
            bar.update(tracker.model, note="done")
    for line in left_out if records else []:
        err.print(line)
    return records


def _prepare(
    backend_name: str,
    dataset: str,
    data_dir: str | None,
    image_size: str | None = None,
    holdout: int | None = None,
    val_fraction: float | None = None,
) -> tuple[Backend, Split, Split, DataFacts]:
    """The backend, the train and test splits and what the model takes from the data: what every
    experiment starts from (its output folder is made once the jobs are planned, so bad input makes
    nothing). With `holdout` or `val_fraction` the test split is that many training images held out
    (datasets.hold_out's fixed draw) and the test set is not read."""

    backend = get_backend(backend_name)
    ds = datasets.load(dataset, data_dir, parse_image_size(image_size))
    train_split, test_split = splits(ds, holdout, val_fraction)  # broken data refused before anything is made
    h, w, c = (int(n) for n in train_split.images.shape[1:4])
    from capsctl.data.images import data_background

    facts = DataFacts(tuple(ds.classes), (h, w, c), data_background(train_split.images))
    return backend, train_split, test_split, facts


def _finish(
    kind: str,
    plan: PairsPlan | AblatePlan,
    backend: Backend,
    train_split: Split,
    results: dict[str, Any],
    models: list[dict[str, Any]],
    out: Path,
    t0: float,
    start_machine: dict[str, Any],
) -> dict[str, Any]:
    """Write results.json: the fields every experiment's results carry (what was run, on what, at what
    cost), then the experiment's own `results`."""
    n_train = len(train_split.images)
    full = {
        "format": RESULTS_FORMAT,
        "kind": kind,
        "command": plan.command,
        "backend": plan.backend,
        "backend_info": backend.describe(),
        "dataset": plan.dataset,
        "train_images": n_train if plan.limit is None else min(plan.limit, n_train),
        "recipe": plan.recipe,
        "limit": plan.limit,
        "eval_limit": plan.eval_limit,
        "composite_seed": COMPOSITE_SEED,
        "tests": list(plan.tests),
        **results,
        "compute_seconds": sum(m["train_seconds"] + m["score_seconds"] for m in models),
        "wall_seconds": time.time() - t0,
        "machine": {**start_machine, "loadavg_end": machine()["loadavg"]},
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    write_results(out, full)
    return full


@contextmanager
def _continued_by(command: str) -> Iterator[None]:
    """A run stopped by Ctrl-C says how to continue it: for an experiment, its own command (it resumes the
    run and skips the finished ones), not the `capsctl train --resume RUN` of that one run."""
    try:
        yield
    except TrainingStopped as e:
        head, said, _ = str(e).partition("; continue with: capsctl train --resume")
        if not said:
            raise
        raise TrainingStopped(
            f"{head}; rerun the experiment to continue it (finished runs are kept): {command}", e.exit_code
        ) from None


def _check_kind(out: Path, kind: str) -> None:
    """Refuse an --out that holds the other kind of experiment: its results.json and tables would be
    replaced and its plots left beside this one's (and `report` would show them under this one)."""
    import json

    try:
        held = json.loads((out / "results.json").read_text())
    except (OSError, ValueError, RecursionError):
        return  # none there (or unreadable: written anew, as before)
    other = held.get("kind") if isinstance(held, dict) else None
    if isinstance(other, str) and other != kind:
        raise CapsctlError(f"--out {out}: holds the results of an experiment {other}; use another --out")
    if isinstance(held, dict) and "merged_from" in held:  # (its runs lie in the merged folders, not here)
        raise CapsctlError(
            f"--out {out}: holds results merged by `capsctl experiment merge` (their runs lie in the folders "
            "merged); run into another --out and merge that in"
        )


def _check_tests_fit(tests: Sequence[str], test_split: Split) -> None:
    """Before any training: a composite test of k digits needs k classes among the test images (on a
    2-class folder, vertical3 failed with "no composites to score" once every model had trained)."""
    classes = len(np.unique(test_split.labels))
    short = [t for t in tests if t in COMPOSITE_TESTS and COMPOSITE_TESTS[t][1] > classes]
    if short:
        k = COMPOSITE_TESTS[short[0]][1]
        fit = [t for t in tests if t not in short]
        instead = f"; pass --tests {','.join(fit)}" if fit else ""
        raise CapsctlError(
            f"--tests {short[0]}: composites of {k} different digits, but the test images hold {classes} "
            f"class(es){instead}"
        )


def _scorer(train_split: Split, test_split: Split, eval_limit: int | None) -> Scorer:
    """The experiment's scorer: its composites as `capsctl eval-pairs` makes them for the models trained
    on `train_split` (whose spec's background follows those images)."""
    from capsctl.data.images import data_background

    return Scorer(test_split, eval_limit, light=data_background(train_split.images) == "light")


def run_pairs(
    plan: PairsPlan, out: Path, show_progress: bool = True, planned: Callable[[], None] | None = None
) -> dict[str, Any]:
    _check_kind(out, "pairs")
    t0 = time.time()
    start_machine = machine()
    backend, train_split, test_split, facts = _prepare(
        plan.backend, plan.dataset, plan.data_dir, plan.image_size, plan.holdout, plan.val_fraction
    )
    _check_tests_fit(plan.tests, test_split)
    # --val-fraction is recorded (run folder names, results) as the count it held out
    holdout = len(test_split.images) if plan.holdout or plan.val_fraction else None
    jobs = [
        make_job(
            out,
            plan.backend,
            plan.dataset,
            plan.recipe,
            h,
            s,
            plan.limit,
            plan.overrides,
            holdout=holdout,
            image_size=plan.image_size,
            data=facts,
            split=(plan.holdout, plan.val_fraction),
            arch=plan.arch,
            compose=plan.compose,
        )
        for s in plan.seeds
        for h in plan.variants
    ]
    made = missing_folders(out)  # (a refused --no-train removes them again)
    out.mkdir(parents=True, exist_ok=True)
    if planned is not None:  # (the caller's notes: said once the input has passed every check)
        planned()
    scorer = _scorer(train_split, test_split, plan.eval_limit)
    with _continued_by(plan.command):
        models = train_and_score(
            backend, jobs, train_split, test_split, scorer, plan.tests, show_progress, train=plan.train
        )
    if not models:
        remove_empty(made)
        raise CapsctlError(f"--out {out}: no finished model to report (--no-train)")
    finished = {m["run"] for m in models}
    missing = [os.path.relpath(j.run, out) for j in jobs if str(j.run) not in finished]
    for m in models:
        m["run"] = os.path.relpath(m["run"], out)
    results = {
        "test_images": len(test_split.images),
        # what changed the models (the capsule head's: pool rows share the column), not every option given
        "overrides": next((j.changes for j in jobs if j.head != "pool"), jobs[0].changes if jobs else {}),
        "holdout": holdout,
        "seeds": list(plan.seeds),
        "heads": list(plan.variants),
        "decoder": plan.decoder,
        "image_size": plan.image_size,
        "compose": plan.compose,
        "arch": plan.arch,
        # (as the curve's own split is cut: fewer where the test split is, --holdout 1000 say)
        "curve_test_images": min(
            CURVE_TEST_IMAGES, plan.eval_limit or CURVE_TEST_IMAGES, len(test_split.images)
        ),
        "models": models,
        "missing": missing,
        "summary": summarize(models, plan.tests),
    }
    return _finish("pairs", plan, backend, train_split, results, models, out, t0, start_machine)


def run_ablate(
    plan: AblatePlan, out: Path, show_progress: bool = True, planned: Callable[[], None] | None = None
) -> dict[str, Any]:
    _check_kind(out, "ablate")
    t0 = time.time()
    start_machine = machine()
    backend, train_split, test_split, facts = _prepare(plan.backend, plan.dataset, plan.data_dir)
    _check_tests_fit(plan.tests, test_split)
    counts = sorted(set(plan.iterations) | {plan.base_iterations})
    jobs = []
    for routing in plan.routings:
        for squash in plan.squashes:
            # attention routes in one pass: its models at other counts would be the same model again
            for r in counts if routing != "attention" else [plan.base_iterations]:
                ov = Overrides(
                    epochs=plan.epochs, shift=plan.shift, routing=routing, squash=squash, routings=r
                )
                kind = "" if plan.arch == "seed" else f"{plan.arch}-"
                name = f"{plan.backend}-{plan.recipe}-{kind}capsule-{routing}-{squash}-r{r}-s{plan.seed}"
                jobs.append(
                    make_job(
                        out,
                        plan.backend,
                        plan.dataset,
                        plan.recipe,
                        "capsule",
                        plan.seed,
                        plan.limit,
                        ov,
                        name,
                        data=facts,
                        arch=plan.arch,
                        composable=False,
                    )
                )
    out.mkdir(parents=True, exist_ok=True)
    if planned is not None:  # (the caller's notes: said once the input has passed every check)
        planned()
    scorer = _scorer(train_split, test_split, plan.eval_limit)

    def eval_at(job: Job) -> Sequence[int | None]:
        iterative = job.spec.capsule.routing != "attention"  # (scored at any count, the same numbers)
        return plan.eval_iterations if iterative and job.spec.capsule.routings == plan.base_iterations else ()

    with _continued_by(plan.command):
        models = train_and_score(
            backend, jobs, train_split, test_split, scorer, plan.tests, show_progress, eval_at
        )
    variants = []
    for routing in plan.routings:
        for squash in plan.squashes:
            mine = [
                m
                for m in models
                if m["spec"]["capsule"]["routing"] == routing and m["spec"]["capsule"]["squash"] == squash
            ]
            base = next(m for m in mine if m["spec"]["capsule"]["routings"] == plan.base_iterations)
            variants.append(
                {
                    "routing": routing,
                    "squash": squash,
                    "trained": [
                        {
                            "routings": m["spec"]["capsule"]["routings"],
                            "run": os.path.relpath(m["run"], out),
                            "tests": m["tests"],
                            "train_seconds": m["train_seconds"],
                            "curve": m["curve"],
                        }
                        for m in mine
                        if m["spec"]["capsule"]["routings"] in plan.iterations or routing == "attention"
                    ],
                    "evaluated": [{"routings": int(r), "tests": t} for r, t in base["eval_at"].items()],
                }
            )
    results = {
        "seed": plan.seed,
        "epochs": jobs[0].config.epochs,
        "shift": jobs[0].config.shift,
        "base_iterations": plan.base_iterations,
        "iterations": list(plan.iterations),
        "eval_iterations": list(plan.eval_iterations),
        "variants": variants,
    }
    return _finish("ablate", plan, backend, train_split, results, models, out, t0, start_machine)
