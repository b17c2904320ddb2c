"""The run folder: its lock, checkpoint and metrics files, and the clean-up of a run that saved nothing.

Every write is atomic, so a run killed at any moment leaves files a `--resume` can continue from."""

from __future__ import annotations

import json
import math
import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from capsctl._io import atomic_write_bytes
from capsctl.errors import CapsctlError
from capsctl.model.spec import ModelSpec
from capsctl.model.weights import (
    CHECKPOINT_FORMAT,
    check_weights,
    encode_safetensors,
    expected_shapes,
    read_safetensors,
    spec_from_metadata,
    trained,
)
from capsctl.training.config import TrainConfig

MODEL_FILE = "model.safetensors"


CHECKPOINT_FILE = "checkpoint.safetensors"


METRICS_FILE = "metrics.jsonl"


LOCK_FILE = ".lock"


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
            raise CapsctlError(
                f"{run}: in use by another capsctl run (pid {other}); use another --out"
            ) from None
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
    # (loss sum, correct, images, seconds) of epoch `epoch` so far: a mid-epoch resume reports the row an
    # uninterrupted run would (its seconds too)
    partial: tuple[float, int, int, float] = (0.0, 0, 0, 0.0)
    # (training images, CRC-32 of their labels) the run trains on: a resume replays its batches, whose order
    # and schedule follow the count (None: a checkpoint written before it was recorded)
    data: tuple[int, int] | None = None


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
        # (loss sum, correct, images) as before, the seconds beside them: a checkpoint stays readable by
        # the capsctl that wrote the format
        "partial": json.dumps(list(ck.partial[:3])),
        "partial_seconds": repr(ck.partial[3]),
        **({} if ck.data is None else {"data": json.dumps(list(ck.data))}),
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
        partial = (float(loss_sum), int(correct), int(seen), float(meta.get("partial_seconds", "0.0")))
        data: tuple[int, int] | None = None
        if "data" in meta:
            images, crc = json.loads(meta["data"])
            data = (int(images), int(crc))
    except (KeyError, ValueError, TypeError, AttributeError, json.JSONDecodeError) as e:
        raise CapsctlError(f"{path}: damaged checkpoint metadata ({e})") from None
    finite = all(math.isfinite(x) for x in (elapsed, partial[0], partial[3]))
    if epoch < 0 or step < 0 or not finite:
        raise CapsctlError(f"{path}: damaged checkpoint metadata (epoch {epoch}, step {step})")
    shapes = expected_shapes(spec)
    weights = {k: v for k, v in tensors.items() if k in shapes}
    check_weights(spec, weights, str(path))
    optim = {k[len("optim.") :]: v for k, v in tensors.items() if k.startswith("optim.")}
    _check_optimizer_state(optim, shapes, str(path))
    return Checkpoint(spec, config, weights, optim, epoch, step, elapsed, partial, data)


def _check_optimizer_state(
    optim: dict[str, np.ndarray], shapes: dict[str, tuple[int, ...]], source: str
) -> None:
    # A damaged slot would otherwise surface as a framework error (or NaN) deep inside the first step.
    if not optim:
        return  # saved before the first step: the optimiser starts fresh
    for name, shape in shapes.items():
        if not trained(name):  # running statistics have no optimiser slots
            continue
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


def missing_folders(run: Path) -> list[Path]:
    """`run` and those of its parents that do not exist yet, innermost first."""
    out = []
    p = run.absolute()
    while not p.exists() and p != p.parent:
        out.append(p)
        p = p.parent
    return out


def stale_temp_files(run: Path) -> list[Path]:
    # temporaries of atomic writes; under the lock, any that exist belong to a killed run
    return [p for name in (MODEL_FILE, CHECKPOINT_FILE, METRICS_FILE) for p in run.glob(f".{name}.tmp-*")]


def discard_empty_run(run: Path, created: list[Path]) -> None:
    """Remove what a fresh run wrote before it stopped without progress (lock, empty metrics, the
    step-0 checkpoint) and the folders it created."""
    import contextlib

    for p in [run / LOCK_FILE, run / METRICS_FILE, run / CHECKPOINT_FILE, *stale_temp_files(run)]:
        with contextlib.suppress(OSError):
            p.unlink()
    remove_empty(created)


def remove_empty(created: list[Path]) -> None:
    """Remove the folders `missing_folders` listed (innermost first) while they are empty (those never
    made are passed over)."""
    for folder in created:
        if not folder.exists():
            continue
        try:
            folder.rmdir()
        except OSError:
            break  # not empty: someone else's files, keep them


def nothing_trained(run: Path) -> bool:
    """True when the run folder's checkpoint is absent or still the step-0 one written at the start."""
    if not (run / CHECKPOINT_FILE).exists():
        return True
    try:
        _, meta = read_safetensors(run / CHECKPOINT_FILE)
    except CapsctlError:
        return False  # not ours to judge: keep it
    return meta.get("epoch") == "0" and meta.get("step") == "0"


def kept_note(run: Path) -> str:
    if nothing_trained(run):
        return "no progress had been saved yet"
    return f"{run / CHECKPOINT_FILE} still holds the last good state"
