"""The training loop, shared by every backend.

The backend only does `trainer.step(x, y, lr)` (with --compose and a decoder, `trainer.step(x, y, lr,
digits)`: each digit alone, for the decoder to redraw). Everything random is drawn here from numpy with
seeds derived from (seed, epoch, step), so a run resumed from any checkpoint replays exactly the
batches an uninterrupted run would have seen."""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from capsctl.backend import Backend, OptimConfig, Trainer
from capsctl.data.composites import set_matches, single_accuracy
from capsctl.data.datasets import Split, data_key
from capsctl.errors import CapsctlError, TrainingStopped
from capsctl.model.fit import check_fit
from capsctl.model.spec import ModelSpec
from capsctl.model.weights import TRAINING_DATA_KEY, init_weights, save_model
from capsctl.training.augment import augment_batch
from capsctl.training.compose import (
    canvas,
    check_classes,
    compose_batch,
    digit_targets,
    draw_pairs,
    scoring_pairs,
)
from capsctl.training.config import TrainConfig, batches, lr_at, steps_per_epoch
from capsctl.training.run_folder import (
    CHECKPOINT_FILE,
    MODEL_FILE,
    Checkpoint,
    discard_empty_run,
    kept_note,
    load_checkpoint,
    missing_folders,
    nothing_trained,
    read_metrics,
    run_lock,
    save_checkpoint,
    stale_temp_files,
    write_metrics,
)

if TYPE_CHECKING:
    from capsctl.training.distributed import World


@dataclass
class EpochReport:
    epoch: int
    loss: float
    train_accuracy: float
    test_accuracy: float | None
    test_images: int | None  # how many test images test_accuracy counts (see TrainConfig.curve_images)
    lr: float
    images_per_s: float
    seconds: float


Hook = Callable[[str, dict[str, Any]], None]

# TrainConfig fields a resumed run takes from the caller rather than from its checkpoint
RESUMABLE_CHANGES = ("backend", "data_dir", "eval_limit")


class _StopFlag:
    """Turns the first Ctrl-C (or SIGTERM: `timeout`, `docker stop`, a batch scheduler) into a request
    honoured between steps (weights never half-updated, the position saved); a second aborts at once,
    leaving the last checkpoint as it was."""

    def __init__(self, enabled: bool = True) -> None:
        self.requested = False
        self._old: dict[int, Any] = {}
        self._enabled = enabled  # off in a distributed job: Ctrl-C stops every rank at once

    def _handler(self, signum: int, frame: Any) -> None:
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True

    def __enter__(self) -> _StopFlag:
        import signal
        import threading

        if self._enabled and threading.current_thread() is threading.main_thread():
            for signum in (signal.SIGINT, signal.SIGTERM):
                self._old[signum] = signal.signal(signum, self._handler)
        return self

    def __exit__(self, *exc: object) -> None:
        import signal

        for signum, old in self._old.items():
            if old is not None:  # (None: a handler not set from Python, which cannot be put back)
                signal.signal(signum, old)


def one_hot(y: np.ndarray, j: int) -> np.ndarray:
    out = np.zeros((len(y), j), np.float32)
    out[np.arange(len(y)), y] = 1.0
    return out


def train(
    backend: Backend,
    spec: ModelSpec,
    cfg: TrainConfig,
    train_split: Split,
    test_split: Split | None,
    run: Path,
    *,
    resume: bool = False,
    show_progress: bool = True,
    on_step: Hook | None = None,
    world: World | None = None,
) -> list[dict[str, Any]]:
    """Train into folder `run` (model, checkpoint, metrics); returns the metrics rows.

    The last epoch is scored on the first `cfg.eval_limit` images of `test_split` (all by default), the
    others on the first `cfg.curve_images` of those. With `cfg.compose` the model trains on composites
    (capsctl.training.compose) and is scored the same way on overlap pairs of the test digits, those
    `capsctl eval-pairs --layout overlap` scores (images and limits then count pairs). With `resume`, `spec`
    and `cfg` come from the run's checkpoint, except the fields in RESUMABLE_CHANGES, taken from `cfg`.

    In a distributed job (`world`, capsctl.training.distributed) rank 0 does all of the above and hands
    its start to the other ranks, which never touch `run`."""
    if not resume:  # refuse data the model cannot take before anything is created
        _check_data(spec, cfg, train_split, test_split)
    if world is not None and world.rank != 0:
        return _train_locked(backend, spec, cfg, train_split, test_split, run, resume, False, on_step, world)
    created = missing_folders(run)
    with run_lock(run):
        if not resume:
            refuse_existing(run)
        try:
            return _train_locked(
                backend, spec, cfg, train_split, test_split, run, resume, show_progress, on_step, world
            )
        except BaseException:
            # a fresh run that stops before any progress was saved leaves nothing behind
            if not resume and not (run / MODEL_FILE).exists() and nothing_trained(run):
                discard_empty_run(run, created)
            raise


def _check_limited_classes(
    spec: ModelSpec, limit: int, kept: np.ndarray, labels: np.ndarray, say: bool
) -> None:
    """`--limit N` takes the first N training images in the data's order: a folder whose file names sort
    class by class (cat.0.jpg … dog.0.jpg) gave one class, and a classifier that says it for every image.
    Fewer than two classes is refused; fewer than the data holds is said (`say`: once, on rank 0)."""
    from capsctl._console import err

    names = spec.class_names or tuple(str(j) for j in range(spec.num_classes))
    held, have = np.unique(kept), np.unique(labels)
    if len(held) < 2 <= len(have):
        raise CapsctlError(
            f"--limit {limit}: the first {len(kept):,} training images (in the data's order) are all of "
            f"class {names[int(held[0])]!r}; a classifier needs two or more: raise --limit, or leave it out"
        )
    if say and len(held) < len(have):
        missing = [names[int(j)] for j in np.setdiff1d(have, held)]
        shown = ", ".join(missing[:5]) + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
        err.print(
            f"note: --limit {limit} keeps {len(held)} of the data's {len(have)} classes (the first images in "
            f"its order); none of {shown}"
        )


def _nan_advice(run: Path, resume: bool) -> str:
    """What to do after a NaN: a resume replays the same batches and rates into the same NaN, and the
    settings are the run's, so the way on is a new run (the folder of a fresh one that saved nothing is
    removed, so its --out can be used again)."""
    if nothing_trained(run) and not resume:
        return " (try a lower --lr)"
    return "; a resume would replay the same steps: start again with a lower --lr and another --out"


def refuse_existing(run: Path) -> None:
    """A new run (no --resume) refuses a folder that holds one."""
    if (run / CHECKPOINT_FILE).exists() or (run / MODEL_FILE).exists():
        raise CapsctlError(
            f"--out {run}: already holds a run; use --resume {run} to continue it, or another --out"
        )


def _check_data(spec: ModelSpec, cfg: TrainConfig, train_split: Split, test_split: Split | None) -> None:
    if cfg.compose is not None:
        _check_compose(spec, cfg, train_split, test_split)
        return
    check_fit(spec, train_split.images, train_split.labels, "model spec", f"{cfg.dataset} training images")
    dec = spec.decoder
    shape = tuple(train_split.images.shape[1:])
    if dec is not None and dec.image_shape is not None and shape != dec.image_shape:
        raise CapsctlError(
            f"model spec: decoder.image_shape is {list(dec.image_shape)}, the {cfg.dataset} training images "
            f"are {list(train_split.images.shape[1:])}"
        )
    if test_split is not None:
        check_fit(spec, test_split.images, test_split.labels, "model spec", f"{cfg.dataset} test images")


def _check_compose(spec: ModelSpec, cfg: TrainConfig, train_split: Split, test_split: Split | None) -> None:
    """--compose: the model takes the composites (of training and of test digits), and each side holds
    two classes to pair."""
    dec = spec.decoder
    h, w, c = train_split.images.shape[1:]
    if dec is not None and dec.image_shape is not None and dec.image_shape != (*canvas(h, w), c):
        raise CapsctlError(
            f"model spec: decoder.image_shape is {list(dec.image_shape)}; with --compose {cfg.compose} the "
            f"decoder redraws each digit on the {list((*canvas(h, w), c))} canvas of the composites"
        )
    for split, what in ((train_split, "training"), (test_split, "test")):
        if split is None:
            continue
        h, w, c = split.images.shape[1:]
        shape = (0, *canvas(h, w), c)  # (check_fit reads only the shape of the images)
        name = f"{cfg.dataset} {what} composites"
        check_fit(spec, np.zeros(shape, np.float32), split.labels, "model spec", name)
    limited = "" if cfg.limit is None else f" (the first {cfg.limit})"
    check_classes(train_split.labels[: cfg.limit], f"{cfg.dataset} training images{limited}")
    if test_split is not None:
        check_classes(test_split.labels, f"{cfg.dataset} test images")


def accuracy(scores: np.ndarray, labels: np.ndarray) -> float:
    """Single digits (labels (N,)): argmax == label; composites (labels (N, k)): top-k set == label set."""
    if labels.ndim == 1:
        return single_accuracy(scores, labels)
    return float(set_matches(scores, labels)[0].mean())


@dataclass
class _Start:
    """Where a run (re)starts: the settings, the rows so far, and the position inside the schedule."""

    spec: ModelSpec
    cfg: TrainConfig
    rows: list[dict[str, Any]]
    epoch: int  # epochs fully done
    step: int  # steps done within `epoch`
    elapsed: float  # training seconds so far
    partial: tuple[float, int, int, float]  # (loss sum, correct, images, seconds) of `epoch` so far
    weights: dict[str, np.ndarray]
    optimizer: dict[str, np.ndarray]
    data: tuple[int, int] | None = None  # the checkpoint's (images, label CRC), if it recorded them


def _start(run: Path, spec: ModelSpec, cfg: TrainConfig, resume: bool) -> _Start:
    if not resume:  # train() has checked that the folder holds no run
        return _Start(spec, cfg, [], 0, 0, 0.0, (0.0, 0, 0, 0.0), init_weights(spec, cfg.seed), {})
    ck = load_checkpoint(run)
    # the checkpoint's settings, except those a resume may change: which framework runs the steps,
    # where the data is found and how many test images are scored (never the weights)
    cfg = replace(ck.config, **{k: getattr(cfg, k) for k in RESUMABLE_CHANGES})
    rows = [r for r in read_metrics(run) if r.get("epoch", 0) <= ck.epoch]
    return _Start(
        ck.spec, cfg, rows, ck.epoch, ck.step, ck.elapsed, ck.partial, ck.weights, ck.optimizer, ck.data
    )


def _share_start(world: World, st: _Start | None) -> _Start:
    """Rank 0's start on every rank, as a checkpoint would carry it (safetensors + JSON, no pickle)."""
    import json

    from capsctl.training.distributed import share_tensors

    tensors = meta = None
    if st is not None:  # rank 0
        tensors = {**st.weights, **{f"optim.{k}": v for k, v in st.optimizer.items()}}
        meta = {
            "spec": st.spec.to_json(),
            "config": st.cfg.to_json(),
            "rows": json.dumps(st.rows),
            "position": json.dumps([st.epoch, st.step, st.elapsed, list(st.partial), st.data]),
        }
    tensors, meta = share_tensors(world, tensors, meta)
    epoch, step, elapsed, (loss_sum, correct, seen, secs), data = json.loads(meta["position"])
    return _Start(
        ModelSpec.from_json(meta["spec"]),
        TrainConfig.from_json(meta["config"]),
        json.loads(meta["rows"]),
        int(epoch),
        int(step),
        float(elapsed),
        (float(loss_sum), int(correct), int(seen), float(secs)),
        {k: v for k, v in tensors.items() if not k.startswith("optim.")},
        {k[len("optim.") :]: v for k, v in tensors.items() if k.startswith("optim.")},
        None if data is None else (int(data[0]), int(data[1])),
    )


def _scored_images(cfg: TrainConfig, test_split: Split | None, epoch: int) -> Split | None:
    """What epoch `epoch` (0-based) is scored on: the last on the first `eval_limit` test images (all
    by default), the others on the first `curve_images` of those only."""
    if test_split is None:
        return None
    n = len(test_split.images) if cfg.eval_limit is None else min(cfg.eval_limit, len(test_split.images))
    if epoch + 1 < cfg.epochs and cfg.curve_images is not None:
        n = min(n, cfg.curve_images)
    return Split(test_split.images[:n], test_split.labels[:n])


def _train_locked(
    backend: Backend,
    spec: ModelSpec,
    cfg: TrainConfig,
    train_split: Split,
    test_split: Split | None,
    run: Path,
    resume: bool,
    show_progress: bool,
    on_step: Hook | None,
    world: World | None = None,
) -> list[dict[str, Any]]:
    from capsctl._console import err

    writer = world is None or world.rank == 0  # the one process that reads and writes `run`
    if world is None:
        st = _start(run, spec, cfg, resume)
    else:
        from capsctl.training.distributed import check_same_data

        st = _share_start(world, _start(run, spec, cfg, resume) if writer else None)
    spec, cfg, rows = st.spec, st.cfg, st.rows
    if resume and st.epoch >= cfg.epochs:
        if writer:
            err.print(f"{run}: already trained for {cfg.epochs} epochs; nothing to do")
        return rows
    if writer:
        for stale in stale_temp_files(run):
            stale.unlink(missing_ok=True)

    x_all, y_all = train_split.images, train_split.labels
    if cfg.limit is not None:
        x_all, y_all = x_all[: cfg.limit], y_all[: cfg.limit]
        _check_limited_classes(spec, cfg.limit, y_all, train_split.labels, writer and not resume)
    n = len(x_all)
    if world is not None:  # every rank walks the same global batches: they must hold the same images
        check_same_data(world, x_all, y_all)
    _check_data(spec, cfg, train_split, test_split)  # again: on --resume the spec comes from the checkpoint
    y_hot = one_hot(y_all, spec.num_classes)
    light = spec.background == "light"  # dark ink on light: shifts and composites fill with white
    if cfg.compose is not None and test_split is not None:
        # scored on overlap pairs of test digits: the last epoch on what `eval-pairs --layout overlap` scores
        test_split = scoring_pairs(test_split, cfg.eval_limit, light)
    data = data_key(y_all)
    # the training part the run drew from (after a hold-out, before --limit), in the model file: `eval
    # --holdout` checks it finds the same, or the held-out images might be ones the model trained on
    trained_on = {TRAINING_DATA_KEY: json.dumps(list(data_key(train_split.labels)))}
    if resume and st.data is not None and st.data != data:
        raise CapsctlError(
            f"--resume {run}: the training data changed since the run started ({st.data[0]:,} images then, "
            f"{n:,} now, or other labels); a resume replays the run's batches, which follow the data: "
            "restore it, or start a new run"
        )
    spe = steps_per_epoch(cfg, n)
    total = spe * cfg.epochs
    if st.step >= spe:
        raise CapsctlError(
            f"{run / CHECKPOINT_FILE}: step {st.step} is past the end of an epoch ({spe} steps); "
            "was the data changed since the run started?"
        )
    if resume and writer:
        err.print(f"resuming {run} at epoch {st.epoch + 1}, step {st.step}")

    optim = OptimConfig(weight_decay=cfg.weight_decay, recon_weight=cfg.recon_weight)
    trainer: Trainer = (
        backend.trainer(spec, st.weights, optim) if world is None else world.trainer(spec, st.weights, optim)
    )
    if st.optimizer:
        trainer.load_optimizer_state(st.optimizer)
    if writer:
        write_metrics(run, rows)
    if not resume and writer:
        # a step-0 checkpoint at once: a run killed at any later moment can be resumed (and replays exactly)
        save_checkpoint(run, Checkpoint(spec, cfg, st.weights, {}, 0, 0, 0.0, data=data))
    elapsed = st.elapsed

    def good_weights(epoch: int) -> dict[str, np.ndarray]:
        # a step can turn the weights NaN while its own loss was still finite: never save such weights
        weights = trainer.weights()
        if not all(np.isfinite(w).all() for w in weights.values()):
            raise TrainingStopped(
                f"the weights became NaN or infinite in epoch {epoch + 1}; {kept_note(run)}"
                f"{_nan_advice(run, resume)}"
            )
        return weights

    def checkpoint(
        epoch: int, step: int, weights: dict[str, np.ndarray], part: tuple[float, int, int, float]
    ) -> None:
        if not writer:
            return
        state = trainer.optimizer_state()
        save_checkpoint(run, Checkpoint(spec, cfg, weights, state, epoch, step, elapsed, part, data))

    from rich.progress import TextColumn

    from capsctl._console import progress

    bar = progress(
        TextColumn("loss {task.fields[loss]:.4f}"),
        TextColumn("acc {task.fields[acc]:.2%}"),
        TextColumn("{task.fields[ips]:.0f} img/s"),
    )
    bar.disable = not show_progress
    stop = _StopFlag(enabled=world is None)
    with bar, stop:
        # the whole run's bar: its time-remaining column is the run's ETA, from the measured step rate
        whole = bar.add_task(
            "run", total=total, completed=st.epoch * spe + st.step, loss=0.0, acc=0.0, ips=0.0
        )
        for epoch in range(st.epoch, cfg.epochs):
            task = bar.add_task(
                f"epoch {epoch + 1}/{cfg.epochs}", total=spe, completed=0, loss=0.0, acc=0.0, ips=0.0
            )
            first = st.step if epoch == st.epoch else 0
            loss_sum, correct, seen, secs_before = st.partial if first else (0.0, 0, 0, 0.0)
            seen_before = seen  # images of this epoch done before a resume: not part of this run's speed
            t0 = time.perf_counter()
            bar.update(task, completed=first)
            lr = cfg.lr
            pairs = None if cfg.compose is None else draw_pairs(y_all, cfg.seed, epoch)
            for step, idx in batches(cfg, epoch, n):
                if step < first:
                    continue
                digits = None
                if pairs is not None:  # composites (their digits already shifted) and both labels
                    x, target = compose_batch(x_all, y_all, pairs, idx, spec.num_classes, light)
                    if spec.decoder is not None:  # and each digit alone, for the decoder to redraw
                        digits = digit_targets(x_all, y_all, pairs, idx, spec.num_classes, light)
                else:
                    rng = np.random.default_rng([cfg.seed, epoch, step])
                    x = augment_batch(x_all[idx], cfg.shift, cfg.scale, rng, light)
                    target = y_hot[idx]
                lr = lr_at(cfg, epoch * spe + step, total)
                if digits is None:
                    loss, ok = trainer.step(x, target, lr)
                else:  # (a trainer gets DigitTargets only when there are some)
                    loss, ok = trainer.step(x, target, lr, digits)
                if not math.isfinite(loss):
                    raise TrainingStopped(
                        f"loss became {loss} at epoch {epoch + 1}, step {step + 1}; training stopped, "
                        f"{kept_note(run)}{_nan_advice(run, resume)}"
                    )
                loss_sum += loss * len(idx)
                correct += ok
                seen += len(idx)
                ips = (seen - seen_before) / max(time.perf_counter() - t0, 1e-9)
                bar.update(task, advance=1, loss=loss_sum / seen, acc=correct / seen, ips=ips)
                bar.update(whole, advance=1, loss=loss_sum / seen, acc=correct / seen, ips=ips)
                if on_step is not None:
                    on_step("step", {"epoch": epoch, "step": step})
                if stop.requested and step + 1 < spe:
                    spent = time.perf_counter() - t0
                    elapsed += spent
                    part = (loss_sum, correct, seen, secs_before + spent)
                    checkpoint(epoch, step + 1, good_weights(epoch), part)
                    bar.stop()
                    err.print(
                        f"interrupted: saved epoch {epoch + 1}, step {step + 1} to {run / CHECKPOINT_FILE}"
                    )
                    raise TrainingStopped(
                        f"interrupted; continue with: capsctl train --resume {run}", exit_code=130
                    )
            train_time = time.perf_counter() - t0
            elapsed += train_time
            scored = _scored_images(cfg, test_split, epoch)
            test_acc = None if scored is None else accuracy(trainer.scores(scored.images), scored.labels)
            row = asdict(
                EpochReport(
                    epoch + 1,
                    loss_sum / max(seen, 1),
                    correct / max(seen, 1),
                    test_acc,
                    None if scored is None else len(scored.images),
                    lr,
                    (seen - seen_before) / max(train_time, 1e-9),
                    secs_before + train_time,  # (the epoch's seconds before a mid-epoch resume too)
                )
            )
            if cfg.compose is not None:  # test_accuracy and test_images are of composites: say so
                row["compose"] = cfg.compose
            rows.append(row)
            bar.remove_task(task)
            test_txt = ""
            if test_acc is not None:
                of = f"{row['test_images']:,}" + (" pairs" if cfg.compose is not None else "")
                test_txt = f"  test {test_acc:.2%} of {of}"
            if writer:
                err.print(
                    f"epoch {epoch + 1}/{cfg.epochs}  loss {row['loss']:.4f}  "
                    f"train {row['train_accuracy']:.2%}{test_txt}  {row['images_per_s']:.0f} img/s"
                )
            weights = good_weights(epoch)
            # model, metrics, then checkpoint: a kill between any two leaves a checkpoint that is at most
            # one epoch behind, and its resume rewrites the later rows, so no epoch's row is ever lost
            if writer:
                save_model(run / MODEL_FILE, spec, weights, trained_on)
                write_metrics(run, rows)
            checkpoint(epoch + 1, 0, weights, (0.0, 0, 0, 0.0))
            if on_step is not None:
                on_step("epoch", row)
            if stop.requested and epoch + 1 < cfg.epochs:
                bar.stop()
                raise TrainingStopped(
                    f"interrupted after epoch {epoch + 1} (saved); continue with: capsctl train --resume "
                    f"{run}",
                    exit_code=130,
                )
    return rows
