"""The training loop, shared by every backend.

The backend only does `trainer.step(x, y, lr)`. Everything random is drawn here from numpy with
seeds derived from (seed, epoch, step), so a run resumed from any checkpoint replays exactly the
batches an uninterrupted run would have seen."""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from capsctl.backend import Backend, OptimConfig, Trainer
from capsctl.data.composites import single_accuracy
from capsctl.data.datasets import Split
from capsctl.errors import CapsctlError, TrainingStopped
from capsctl.model.fit import check_fit
from capsctl.model.spec import ModelSpec
from capsctl.model.weights import init_weights, save_model
from capsctl.training.augment import augment_batch
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


@dataclass
class EpochReport:
    epoch: int
    loss: float
    train_accuracy: float
    test_accuracy: float | None
    lr: float
    images_per_s: float
    seconds: float


Hook = Callable[[str, dict[str, Any]], None]


class _StopFlag:
    """Turns the first Ctrl-C into a request honoured between steps (weights never half-updated);
    a second Ctrl-C aborts at once, leaving the last checkpoint as it was."""

    def __init__(self) -> None:
        self.requested = False
        self._old: Any = None

    def _handler(self, signum: int, frame: Any) -> None:
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True

    def __enter__(self) -> _StopFlag:
        import signal
        import threading

        if threading.current_thread() is threading.main_thread():
            self._old = signal.signal(signal.SIGINT, self._handler)
        return self

    def __exit__(self, *exc: object) -> None:
        import signal

        if self._old is not None:
            signal.signal(signal.SIGINT, self._old)


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
) -> list[dict[str, Any]]:
    """Train into folder `run` (model, checkpoint, metrics); returns the metrics rows."""
    if not resume:  # refuse data the model cannot take before anything is created
        _check_data(spec, cfg, train_split, test_split)
    created = missing_folders(run)
    with run_lock(run):
        if not resume and ((run / CHECKPOINT_FILE).exists() or (run / MODEL_FILE).exists()):
            raise CapsctlError(f"--out {run}: already holds a run; use --resume {run} to continue it, or another --out")
        try:
            return _train_locked(backend, spec, cfg, train_split, test_split, run, resume, show_progress, on_step)
        except BaseException:
            # a fresh run that stops before any progress was saved leaves nothing behind
            if not resume and not (run / MODEL_FILE).exists() and nothing_trained(run):
                discard_empty_run(run, created)
            raise


def _check_data(spec: ModelSpec, cfg: TrainConfig, train_split: Split, test_split: Split | None) -> None:
    check_fit(spec, train_split.images, train_split.labels, "model spec", f"{cfg.dataset} training images")
    if test_split is not None:
        check_fit(spec, test_split.images, test_split.labels, "model spec", f"{cfg.dataset} test images")


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
) -> list[dict[str, Any]]:
    from capsctl._console import err

    if resume:
        ck = load_checkpoint(run)
        spec, cfg = ck.spec, replace(ck.config, backend=cfg.backend) if cfg.backend != ck.config.backend else ck.config
        rows = [r for r in read_metrics(run) if r.get("epoch", 0) <= ck.epoch]
        start_epoch, start_step, elapsed, partial = ck.epoch, ck.step, ck.elapsed, ck.partial
        weights, optim_state = ck.weights, ck.optimizer
        if start_epoch >= cfg.epochs:
            err.print(f"{run}: already trained for {cfg.epochs} epochs; nothing to do")
            return rows
    else:  # train() has checked that the folder holds no run
        rows, start_epoch, start_step, elapsed, partial = [], 0, 0, 0.0, (0.0, 0, 0)
        weights, optim_state = init_weights(spec, cfg.seed), {}
    for stale in stale_temp_files(run):
        stale.unlink(missing_ok=True)

    x_all, y_all = train_split.images, train_split.labels
    if cfg.limit is not None:
        x_all, y_all = x_all[: cfg.limit], y_all[: cfg.limit]
    n = len(x_all)
    _check_data(spec, cfg, train_split, test_split)  # again: on --resume the spec comes from the checkpoint
    y_hot = one_hot(y_all, spec.num_classes)
    spe = steps_per_epoch(cfg, n)
    total = spe * cfg.epochs
    if start_step >= spe:
        raise CapsctlError(f"{run / CHECKPOINT_FILE}: step {start_step} is past the end of an epoch ({spe} steps); "
                           "was the data changed since the run started?")
    if resume:
        err.print(f"resuming {run} at epoch {start_epoch + 1}, step {start_step}")

    trainer: Trainer = backend.trainer(spec, weights, OptimConfig(weight_decay=cfg.weight_decay))
    if optim_state:
        trainer.load_optimizer_state(optim_state)
    write_metrics(run, rows)
    if not resume:
        # a step-0 checkpoint at once: a run killed at any later moment can be resumed (and replays exactly)
        save_checkpoint(run, Checkpoint(spec, cfg, weights, {}, 0, 0, 0.0))

    def good_weights(epoch: int) -> dict[str, np.ndarray]:
        # a step can turn the weights NaN while its own loss was still finite: never save such weights
        weights = trainer.weights()
        if not all(np.isfinite(w).all() for w in weights.values()):
            raise TrainingStopped(f"the weights became NaN or infinite in epoch {epoch + 1}; {kept_note(run)} (lower --lr?)")
        return weights

    def checkpoint(epoch: int, step: int, weights: dict[str, np.ndarray], part: tuple[float, int, int]) -> None:
        save_checkpoint(run, Checkpoint(spec, cfg, weights, trainer.optimizer_state(), epoch, step, elapsed, part))

    from rich.progress import TextColumn

    from capsctl._console import progress

    bar = progress(TextColumn("loss {task.fields[loss]:.4f}"), TextColumn("acc {task.fields[acc]:.2%}"),
                   TextColumn("{task.fields[ips]:.0f} img/s"))
    bar.disable = not show_progress
    stop = _StopFlag()
    with bar, stop:
        for epoch in range(start_epoch, cfg.epochs):
            task = bar.add_task(f"epoch {epoch + 1}/{cfg.epochs}", total=spe, completed=0, loss=0.0, acc=0.0, ips=0.0)
            first = start_step if epoch == start_epoch else 0
            loss_sum, correct, seen = partial if first else (0.0, 0, 0)
            seen_before = seen  # images of this epoch done before a resume: not part of this run's speed
            t0 = time.perf_counter()
            bar.update(task, completed=first)
            lr = cfg.lr
            for step, idx in batches(cfg, epoch, n):
                if step < first:
                    continue
                x = augment_batch(x_all[idx], cfg.shift, cfg.scale, np.random.default_rng([cfg.seed, epoch, step]))
                lr = lr_at(cfg, epoch * spe + step, total)
                loss, ok = trainer.step(x, y_hot[idx], lr)
                if not math.isfinite(loss):
                    raise TrainingStopped(
                        f"loss became {loss} at epoch {epoch + 1}, step {step + 1}; training stopped, {kept_note(run)} (lower --lr?)"
                    )
                loss_sum += loss * len(idx)
                correct += ok
                seen += len(idx)
                dt = time.perf_counter() - t0
                bar.update(task, advance=1, loss=loss_sum / seen, acc=correct / seen, ips=(seen - seen_before) / max(dt, 1e-9))
                if on_step is not None:
                    on_step("step", {"epoch": epoch, "step": step})
                if stop.requested and step + 1 < spe:
                    elapsed += time.perf_counter() - t0
                    checkpoint(epoch, step + 1, good_weights(epoch), (loss_sum, correct, seen))
                    bar.stop()
                    err.print(f"interrupted: saved epoch {epoch + 1}, step {step + 1} to {run / CHECKPOINT_FILE}")
                    raise TrainingStopped(f"interrupted; continue with: capsctl train --resume {run}", exit_code=130)
            train_time = time.perf_counter() - t0
            elapsed += train_time
            test_acc = None
            if test_split is not None:
                test_acc = single_accuracy(trainer.scores(test_split.images), test_split.labels)
            row = asdict(EpochReport(epoch + 1, loss_sum / max(seen, 1), correct / max(seen, 1), test_acc, lr,
                                     (seen - seen_before) / max(train_time, 1e-9), train_time))
            rows.append(row)
            bar.remove_task(task)
            test_txt = f"  test {test_acc:.2%}" if test_acc is not None else ""
            err.print(f"epoch {epoch + 1}/{cfg.epochs}  loss {row['loss']:.4f}  train {row['train_accuracy']:.2%}"
                      f"{test_txt}  {row['images_per_s']:.0f} img/s")
            weights = good_weights(epoch)
            # model, metrics, then checkpoint: a kill between any two leaves a checkpoint that is at most
            # one epoch behind, and its resume rewrites the later rows, so no epoch's row is ever lost
            save_model(run / MODEL_FILE, spec, weights)
            write_metrics(run, rows)
            checkpoint(epoch + 1, 0, weights, (0.0, 0, 0))
            if on_step is not None:
                on_step("epoch", row)
            if stop.requested and epoch + 1 < cfg.epochs:
                bar.stop()
                raise TrainingStopped(f"interrupted after epoch {epoch + 1} (saved); continue with: capsctl train --resume {run}", exit_code=130)
    return rows
