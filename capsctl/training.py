"""The training loop, shared by every backend: data order, augmentation, schedule, checkpoints.

The backend only does `trainer.step(x, y, lr)`. Everything random is drawn here from numpy with
seeds derived from (seed, epoch, step), so a run resumed from any checkpoint replays exactly the
batches an uninterrupted run would have seen.
"""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from ._atomic import atomic_write_bytes
from ._fit import check_fit
from .backends import Backend, OptimConfig, Trainer
from .composites import single_accuracy
from .datasets import Split
from .errors import CapsctlError, TrainingStopped
from .recipes import SCHEDULES
from .spec import ModelSpec
from .weights import (
    CHECKPOINT_FORMAT,
    check_weights,
    encode_safetensors,
    expected_shapes,
    init_weights,
    read_safetensors,
    save_model,
    spec_from_metadata,
)

MODEL_FILE = "model.safetensors"
CHECKPOINT_FILE = "checkpoint.safetensors"
METRICS_FILE = "metrics.jsonl"
LOCK_FILE = ".lock"


@dataclass(frozen=True)
class TrainConfig:
    backend: str = "torch"  # framework that runs the steps
    dataset: str = "mnist"  # data set name (see `capsctl data list`)
    epochs: int = 20  # passes over the training images
    batch_size: int = 128  # images per optimiser step
    lr: float = 3e-3  # learning rate (the peak of the one-cycle schedule)
    schedule: str = "onecycle"  # 'constant' or 'onecycle'
    shift: int = 3  # random ±shift pixel translation of training images (0 = off)
    scale: float = 0.0  # random zoom of training images by a factor in [1 - scale, 1 + scale] (0 = off)
    weight_decay: float = 0.0  # AdamW decoupled weight decay
    seed: int = 0  # initial weights, data order and augmentation
    limit: int | None = None  # train on the first N images only (smoke runs)
    recipe: str = "default"  # the recipe these values came from (for the record)

    def __post_init__(self) -> None:
        if self.epochs < 1:
            raise CapsctlError(f"--epochs must be at least 1, got {self.epochs}")
        if not 1 <= self.batch_size <= 65536:
            raise CapsctlError(f"--batch-size must be in 1..65536, got {self.batch_size}")
        if not (math.isfinite(self.lr) and 0 < self.lr <= 10):
            raise CapsctlError(f"--lr must be in (0, 10], got {self.lr}")
        if self.schedule not in SCHEDULES:
            raise CapsctlError(f"--schedule must be one of {', '.join(SCHEDULES)}, got {self.schedule!r}")
        if not 0 <= self.shift <= 14:
            raise CapsctlError(f"--shift must be in 0..14 pixels, got {self.shift}")
        if not (math.isfinite(self.scale) and 0 <= self.scale <= 0.5):
            raise CapsctlError(f"--scale must be in [0, 0.5], got {self.scale}")
        if not (math.isfinite(self.weight_decay) and 0 <= self.weight_decay < 1):
            raise CapsctlError(f"--weight-decay must be in [0, 1), got {self.weight_decay}")
        if self.seed < 0:
            raise CapsctlError(f"--seed must be non-negative, got {self.seed}")
        if self.limit is not None and self.limit < 1:
            raise CapsctlError(f"--limit must be at least 1, got {self.limit}")

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_json(cls, text: str) -> TrainConfig:
        return cls(**json.loads(text))


def lr_at(cfg: TrainConfig, step: int, total: int) -> float:
    """Learning rate for global step `step` of `total`.

    one-cycle: cosine rise from lr/25 to lr over the first 30% of steps, cosine fall to lr/25e4.
    """
    if cfg.schedule == "constant":
        return cfg.lr
    warm = max(1, int(0.3 * total))
    lo, hi, end = cfg.lr / 25.0, cfg.lr, cfg.lr / 25e4
    if step < warm:
        t = step / warm
        return lo + (hi - lo) * (1 - math.cos(math.pi * t)) / 2
    t = min(1.0, (step - warm) / max(1, total - warm))
    return end + (hi - end) * (1 + math.cos(math.pi * t)) / 2


def shift_batch(x: np.ndarray, shift: int, rng: np.random.Generator) -> np.ndarray:
    """Translate each image by its own random (dy, dx) in [-shift, shift], filling with zeros."""
    if shift == 0:
        return x
    b, h, w, c = x.shape
    pad = np.zeros((b, h + 2 * shift, w + 2 * shift, c), x.dtype)
    pad[:, shift : shift + h, shift : shift + w] = x
    d = rng.integers(0, 2 * shift + 1, size=(b, 2))
    rows = d[:, 0, None, None] + np.arange(h)[None, :, None]
    cols = d[:, 1, None, None] + np.arange(w)[None, None, :]
    return pad[np.arange(b)[:, None, None], rows, cols]


def augment_batch(x: np.ndarray, shift: int, scale: float, rng: np.random.Generator) -> np.ndarray:
    """Zoom each image about its centre by its own factor in [1 - scale, 1 + scale], then shift it.

    Without zoom this is exactly `shift_batch` (same random draws), so runs without --scale are
    unchanged. The zoom is axis-aligned, so it is separable: out = Ry @ image @ Rxᵀ, where each
    row of Ry holds the bilinear (hat-function) weights of one output row's source position;
    sources outside the image get no weight, which fills with zeros.
    """
    if scale == 0:
        return shift_batch(x, shift, rng)
    b, h, w, _ = x.shape
    s = rng.uniform(1 - scale, 1 + scale, size=(b, 1))
    d = rng.integers(-shift, shift + 1, size=(b, 2)) if shift else np.zeros((b, 2), np.int64)
    cy, cx = (h - 1) / 2, (w - 1) / 2
    src_r = (np.arange(h)[None, :] - d[:, :1] - cy) / s + cy  # (b, h): source row of each output row
    src_c = (np.arange(w)[None, :] - d[:, 1:] - cx) / s + cx
    ry = np.maximum(0.0, 1.0 - np.abs(src_r[:, :, None] - np.arange(h)[None, None, :])).astype(x.dtype)
    rx = np.maximum(0.0, 1.0 - np.abs(src_c[:, :, None] - np.arange(w)[None, None, :])).astype(x.dtype)
    return np.einsum("bik,bklc,bjl->bijc", ry, x, rx, optimize=True)


def epoch_order(seed: int, epoch: int, n: int) -> np.ndarray:
    return np.random.default_rng([seed, epoch]).permutation(n)


def batches(cfg: TrainConfig, epoch: int, n: int) -> Iterator[tuple[int, np.ndarray]]:
    order = epoch_order(cfg.seed, epoch, n)
    for step, start in enumerate(range(0, n, cfg.batch_size)):
        yield step, order[start : start + cfg.batch_size]


def steps_per_epoch(cfg: TrainConfig, n: int) -> int:
    return -(-n // cfg.batch_size)


# -- run folder --------------------------------------------------------------------------

@contextmanager
def run_lock(run: Path) -> Iterator[None]:
    """An exclusive lock on the run folder: a second run on it is refused, not interleaved."""
    import fcntl

    if run.exists() and not run.is_dir():
        raise CapsctlError(f"{run}: is a file, expected a run folder")
    try:
        run.mkdir(parents=True, exist_ok=True)
        fd = os.open(run / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as e:
        raise CapsctlError(f"{run}: cannot create the run folder ({e.strerror or e})") from None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            other = os.pread(fd, 32, 0).decode(errors="replace").strip() or "?"
            raise CapsctlError(f"{run}: in use by another capsctl run (pid {other}); use another --out") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, str(os.getpid()).encode(), 0)
        yield
    finally:
        os.close(fd)


@dataclass
class Checkpoint:
    spec: ModelSpec
    config: TrainConfig
    weights: dict[str, np.ndarray]
    optimizer: dict[str, np.ndarray]
    epoch: int  # epochs fully done
    step: int  # steps done within epoch `epoch` (0 at an epoch boundary)
    elapsed: float  # training seconds so far
    # (loss sum, correct, images) of epoch `epoch` so far, so a mid-epoch resume reports the same row
    partial: tuple[float, int, int] = (0.0, 0, 0)


def save_checkpoint(run: Path, ck: Checkpoint) -> None:
    tensors = dict(ck.weights)
    tensors.update({f"optim.{k}": v for k, v in ck.optimizer.items()})
    meta = {
        "format": CHECKPOINT_FORMAT,
        "spec": ck.spec.to_json(),
        "config": ck.config.to_json(),
        "epoch": str(ck.epoch),
        "step": str(ck.step),
        "elapsed": repr(ck.elapsed),
        "partial": json.dumps(list(ck.partial)),
    }
    atomic_write_bytes(run / CHECKPOINT_FILE, encode_safetensors(tensors, meta))


def load_checkpoint(run: Path) -> Checkpoint:
    path = run / CHECKPOINT_FILE
    if not path.exists():
        raise CapsctlError(f"--resume {run}: no {CHECKPOINT_FILE} there (nothing to resume)")
    tensors, meta = read_safetensors(path)
    spec = spec_from_metadata(meta, str(path), CHECKPOINT_FORMAT)
    try:
        config = TrainConfig.from_json(meta["config"])
        epoch, step, elapsed = int(meta["epoch"]), int(meta["step"]), float(meta["elapsed"])
        loss_sum, correct, seen = json.loads(meta.get("partial", "[0.0, 0, 0]"))
        partial = (float(loss_sum), int(correct), int(seen))
    except (KeyError, ValueError, TypeError, json.JSONDecodeError) as e:
        raise CapsctlError(f"{path}: damaged checkpoint metadata ({e})") from None
    if epoch < 0 or step < 0 or not math.isfinite(elapsed) or not math.isfinite(partial[0]):
        raise CapsctlError(f"{path}: damaged checkpoint metadata (epoch {epoch}, step {step})")
    shapes = expected_shapes(spec)
    weights = {k: v for k, v in tensors.items() if k in shapes}
    check_weights(spec, weights, str(path))
    optim = {k[len("optim.") :]: v for k, v in tensors.items() if k.startswith("optim.")}
    _check_optimizer_state(optim, shapes, str(path))
    return Checkpoint(spec, config, weights, optim, epoch, step, elapsed, partial)


def _check_optimizer_state(optim: dict[str, np.ndarray], shapes: dict[str, tuple[int, ...]], source: str) -> None:
    # A damaged slot would otherwise surface as a framework error (or NaN) deep inside the first step.
    if not optim:
        return  # saved before the first step: the optimiser starts fresh
    for name, shape in shapes.items():
        for slot in ("m", "v"):
            arr = optim.get(f"{slot}.{name}")
            if arr is None or arr.shape != shape or arr.dtype != np.float32 or not np.isfinite(arr).all():
                raise CapsctlError(f"{source}: optimizer state {slot}.{name} is missing or damaged")
    step = optim.get("step")
    if step is None or step.shape != (1,) or not np.isfinite(step).all() or step[0] < 0:
        raise CapsctlError(f"{source}: optimizer state 'step' is missing or damaged")


def read_metrics(run: Path) -> list[dict[str, Any]]:
    path = run / METRICS_FILE
    if not path.exists():
        return []
    rows = []
    for line in path.read_text().splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            break  # a torn last line from a kill: drop it
    return rows


def write_metrics(run: Path, rows: list[dict[str, Any]]) -> None:
    atomic_write_bytes(run / METRICS_FILE, "".join(json.dumps(r) + "\n" for r in rows).encode())


# -- the loop ----------------------------------------------------------------------------

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
    created = _missing_folders(run)
    with run_lock(run):
        if not resume and ((run / CHECKPOINT_FILE).exists() or (run / MODEL_FILE).exists()):
            raise CapsctlError(f"--out {run}: already holds a run; use --resume {run} to continue it, or another --out")
        try:
            return _train_locked(backend, spec, cfg, train_split, test_split, run, resume, show_progress, on_step)
        except BaseException:
            # a fresh run that stops before any progress was saved leaves nothing behind
            if not resume and not (run / MODEL_FILE).exists() and _nothing_trained(run):
                _discard_empty_run(run, created)
            raise


def _check_data(spec: ModelSpec, cfg: TrainConfig, train_split: Split, test_split: Split | None) -> None:
    check_fit(spec, train_split.images, train_split.labels, "model spec", f"{cfg.dataset} training images")
    if test_split is not None:
        check_fit(spec, test_split.images, test_split.labels, "model spec", f"{cfg.dataset} test images")


def _missing_folders(run: Path) -> list[Path]:
    """`run` and those of its parents that do not exist yet, innermost first."""
    out = []
    p = run.absolute()
    while not p.exists() and p != p.parent:
        out.append(p)
        p = p.parent
    return out


def _stale_temp_files(run: Path) -> list[Path]:
    # temporaries of atomic writes; under the lock, any that exist belong to a killed run
    return [p for name in (MODEL_FILE, CHECKPOINT_FILE, METRICS_FILE) for p in run.glob(f".{name}.tmp-*")]


def _discard_empty_run(run: Path, created: list[Path]) -> None:
    """Remove what a fresh run wrote before it stopped without progress (lock, empty metrics, the
    step-0 checkpoint) and the folders it created."""
    import contextlib

    for p in [run / LOCK_FILE, run / METRICS_FILE, run / CHECKPOINT_FILE, *_stale_temp_files(run)]:
        with contextlib.suppress(OSError):
            p.unlink()
    for folder in created:
        try:
            folder.rmdir()
        except OSError:
            break  # not empty: someone else's files, keep them


def _nothing_trained(run: Path) -> bool:
    """True when the run folder's checkpoint is absent or still the step-0 one written at the start."""
    if not (run / CHECKPOINT_FILE).exists():
        return True
    try:
        _, meta = read_safetensors(run / CHECKPOINT_FILE)
    except CapsctlError:
        return False  # not ours to judge: keep it
    return meta.get("epoch") == "0" and meta.get("step") == "0"


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
    from ._console import err

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
    for stale in _stale_temp_files(run):
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
            raise TrainingStopped(f"the weights became NaN or infinite in epoch {epoch + 1}; {_kept(run)} (lower --lr?)")
        return weights

    def checkpoint(epoch: int, step: int, weights: dict[str, np.ndarray], part: tuple[float, int, int]) -> None:
        save_checkpoint(run, Checkpoint(spec, cfg, weights, trainer.optimizer_state(), epoch, step, elapsed, part))

    from rich.progress import TextColumn

    from ._console import progress

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
                        f"loss became {loss} at epoch {epoch + 1}, step {step + 1}; training stopped, {_kept(run)} (lower --lr?)"
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


def _kept(run: Path) -> str:
    if _nothing_trained(run):
        return "no progress had been saved yet"
    return f"{run / CHECKPOINT_FILE} still holds the last good state"
