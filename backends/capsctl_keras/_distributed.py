"""Data-parallel training on TensorFlow: tf.distribute.MultiWorkerMirroredStrategy, configured from
TF_CONFIG (what TF's own launchers and cluster resolvers set), one worker process per rank. The rules are
capsctl.training.distributed's; `capsctl train --backend keras --nproc N` writes N local TF_CONFIGs and
starts the workers.

How the Keras 3 pieces run under the strategy (docs/DISTRIBUTED.md):
- the model and the optimiser are built inside `strategy.scope()`, so their variables are mirrored;
- the step is our own `tf.function` calling `strategy.run`, not `model.fit` (capsctl's loop owns the
  batch order, the schedule and the checkpoints); inside it, Keras' TF optimiser all-reduces (sums) the
  replicas' gradients before its update, so rank r's mean loss is weighted by n_r / B;
- bytes (the start handed out by rank 0) and scores cross between workers as tensors through the same
  strategy's all-reduce: rank 0 contributes the data, the others zeros, and x + 0 is exact."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Mapping
from typing import Any, TypeVar

import numpy as np

from capsctl.backend import DigitTargets, OptimConfig, Trainer
from capsctl.errors import CapsctlError, TrainingStopped, first_line, is_out_of_memory
from capsctl.model.spec import ModelSpec
from capsctl.training.distributed import (
    NPROC_JOB_ENV,
    UNRESPONSIVE_EXIT,
    World,
    check_port,
    lost_contact,
    parse_tf_config,
    rank_slice,
    tf_configs,
    timeout_s,
)

from ._env import tf
from ._layers import BatchNorm
from ._trainer import KerasTrainer, correct_rows, digit_constants, digit_signature

T = TypeVar("T")
def _lost(e: BaseException) -> BaseException:
    timed_out = isinstance(e, tf.errors.DeadlineExceededError) or "timed out" in str(e).lower()
    return lost_contact(_gist(e), timed_out, "worker")


def _collective(fn: Callable[[], T]) -> T:
    """Run something that talks to the other workers; a worker that died or timed out is one line."""
    try:
        return fn()
    except (tf.errors.OpError, RuntimeError) as e:  # Unavailable, DeadlineExceeded, Cancelled, Aborted, …
        if is_out_of_memory(e):  # (ResourceExhausted is an OpError too: this worker's own failure)
            raise
        raise _lost(e) from None


class KerasWorld:
    def __init__(self, strategy: Any, rank: int, size: int) -> None:
        self.strategy, self.rank, self.size = strategy, rank, size
        self._sums: dict[np.dtype[Any], Any] = {}  # one compiled all-reduce per dtype (any length)

    def all_sum(self, value: np.ndarray) -> np.ndarray:
        """The sum of every worker's `value` (same shape and dtype on all), on every worker."""
        flat = np.ascontiguousarray(value).reshape(-1)
        fn = self._sums.get(flat.dtype)
        if fn is None:  # compiled: the strategy run eagerly is slow and says so on every call
            def summed(t: Any) -> Any:
                mine = self.strategy.run(tf.identity, args=(t,))
                return self.strategy.reduce(tf.distribute.ReduceOp.SUM, mine, axis=None)

            fn = tf.function(summed, input_signature=[tf.TensorSpec((None,), tf.as_dtype(flat.dtype))])
            self._sums[flat.dtype] = fn
        return np.asarray(_collective(lambda: fn(tf.constant(flat)))).reshape(value.shape)

    def broadcast_bytes(self, data: bytes | None) -> bytes:
        n = int(self.all_sum(np.array([len(data) if self.rank == 0 and data else 0], np.int64))[0])
        buf = np.zeros(-(-n // 8), np.int64)  # eight bytes an element: int64 all-reduces are exact
        if self.rank == 0 and data:
            buf.view(np.uint8)[:n] = np.frombuffer(data, np.uint8)
        return self.all_sum(buf).view(np.uint8)[:n].tobytes() if n else b""

    def trainer(self, spec: ModelSpec, weights: Mapping[str, np.ndarray], optim: OptimConfig) -> Trainer:
        return DistributedKerasTrainer(spec, weights, optim, self)

    def close(self) -> None:
        pass  # the strategy's servers end with the process


# A C++ log record (absl: "E1129 00:12:03.123456  1612 file.cc:252] …"; lines without that head
# continue the record before them); fatal ones ("F…") are kept, and so is a crash report of Python's own
_RECORD = re.compile(rb"^[IWEF]\d{4} [\d:.]+\s+\d+ \S+\] ")
_KEEP = re.compile(rb"^(?:F\d{4} |Fatal Python error)")


def _filter_cpp_log() -> None:
    """Route fd 2 through a filter that drops TensorFlow's C++ log, so a worker that lost the others
    says one line (the launcher's, with `--nproc`), not a dozen about the broken gRPC call. After this,
    only C/C++ code writes to fd 2: Python's sys.stderr writes to the original stream (a terminal stays a
    terminal for the progress bars). Set TF_CPP_MIN_LOG_LEVEL=0 to see TensorFlow's whole log."""
    import io
    import threading

    sys.stderr.flush()
    original = os.dup(2)
    read, write = os.pipe()
    os.dup2(write, 2)
    os.close(write)
    encoding = getattr(sys.stderr, "encoding", None) or "utf-8"
    sink = io.FileIO(original, "w", closefd=False)
    sys.stderr = io.TextIOWrapper(sink, encoding=encoding, errors="backslashreplace", line_buffering=True)

    def forward() -> None:
        keep = False
        with io.FileIO(read, "r") as pipe:
            for line in io.BufferedReader(pipe):
                if _RECORD.match(line) or _KEEP.match(line):
                    keep = bool(_KEEP.match(line))
                if keep:
                    os.write(original, line)

    threading.Thread(target=forward, name="capsctl-tf-log-filter", daemon=True).start()


def _gist(e: BaseException) -> str:
    """A TensorFlow error's message without its graph-function prefix, first line, at most 160 chars."""
    text = re.sub(r"\{\{function_node [^}]*\}\}\s*", "", getattr(e, "message", None) or str(e))
    return first_line(Exception(text), type(e).__name__)[:160].rstrip(" :")


def join() -> World:
    rank, size = parse_tf_config(os.environ.get("TF_CONFIG"))
    if os.environ.get("TF_CPP_MIN_LOG_LEVEL") != "0":  # (0, set by the user: TensorFlow's whole log)
        _filter_cpp_log()
    options = tf.distribute.experimental.CommunicationOptions(timeout_seconds=timeout_s())
    try:
        strategy = tf.distribute.MultiWorkerMirroredStrategy(communication_options=options)
    except (RuntimeError, ValueError, tf.errors.OpError) as e:
        raise CapsctlError(f"cannot join the job as rank {rank} of {size} ({_gist(e)})") from None
    # TensorFlow's coordination service catches SIGTERM (to notice a preemption), so a rank went on
    # training when the launcher stopped it; the default ends it at once, as on torch
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    if strategy.num_replicas_in_sync != size:
        raise CapsctlError(
            f"each worker must have one device; this job has {strategy.num_replicas_in_sync} replicas on "
            f"{size} workers (show each worker one GPU with CUDA_VISIBLE_DEVICES, or none)"
        )
    return KerasWorld(strategy, rank, size)


def sum_over_ranks(t: Any) -> Any:
    """Σ of a tensor over the replicas, differentiable: TensorFlow's gradient of a replica all-reduce is
    the all-reduce of the replicas' gradients (what torch's SyncBatchNorm does by hand)."""
    return tf.distribute.get_replica_context().all_reduce(tf.distribute.ReduceOp.SUM, t)


class DistributedKerasTrainer:
    """A KerasTrainer whose variables are mirrored: each worker trains on its slice of the global batch."""

    def __init__(
        self, spec: ModelSpec, weights: Mapping[str, np.ndarray], optim: OptimConfig, world: KerasWorld
    ) -> None:
        self.world = world
        with world.strategy.scope():  # (making the variables broadcasts worker 0's initial values)
            self.inner = _collective(lambda: KerasTrainer(spec, weights, optim))
        # batch norms normalise with the global batch's statistics, as one process does (Keras'
        # synchronized=True would too, with E[x²] − mean² and counting an empty slice's dummy image)
        self.batch_norms = [m for m in self.inner.model.layers if isinstance(m, BatchNorm)]
        for bn in self.batch_norms:
            bn.sum_over_ranks = sum_over_ranks
        sig = [
            tf.TensorSpec((None, None, None, spec.in_channels), tf.float32),
            tf.TensorSpec((None, spec.num_classes), tf.float32),
            tf.TensorSpec((), tf.float32),  # learning rate
            tf.TensorSpec((), tf.float32),  # this worker's images in the global batch (0 or more)
            tf.TensorSpec((), tf.float32),  # the global batch
        ]
        self._step = tf.function(self._global_step, input_signature=sig)
        # (traced only when a step brings DigitTargets: --compose with a decoder)
        self._step_digits = tf.function(self._global_step, input_signature=[*sig, *digit_signature(spec)])

    def _global_step(
        self, x: Any, y: Any, lr: Any, n: Any, b: Any, parts: Any = None, part_hot: Any = None
    ) -> Any:
        inner, strategy = self.inner, self.world.strategy
        inner.opt.learning_rate.assign(lr)

        def replica(x: Any, y: Any, *digits: Any) -> Any:
            # the optimiser sums the workers' gradients: weighting each mean loss by n_r / B makes the
            # sum the gradient of the global batch's mean loss (0, on one dummy image, for an empty slice)
            for bn in self.batch_norms:  # (traced once: the graph reads n at every step)
                bn.counts = tf.cast(n > 0, tf.float32)
            loss, p = inner.descend(x, y, n / b, *digits)
            right = tf.reduce_sum(tf.cast(correct_rows(p, y), tf.float64))
            has = tf.cast(n > 0, tf.float64)
            return tf.stack([tf.cast(loss, tf.float64) * tf.cast(n, tf.float64), right * has])

        args = (x, y) if parts is None else (x, y, parts, part_hot)
        stats = strategy.run(replica, args=args)
        return strategy.reduce(tf.distribute.ReduceOp.SUM, stats, axis=None)

    def step(
        self, x: np.ndarray, y_onehot: np.ndarray, lr: float, digits: DigitTargets | None = None
    ) -> tuple[float, int]:
        world = self.world
        b = len(x)
        part = rank_slice(b, world.rank, world.size)
        n = part.stop - part.start
        mine = part if n else slice(0, 1)
        args = [
            tf.constant(np.ascontiguousarray(x[mine], dtype=np.float32)),
            tf.constant(np.ascontiguousarray(y_onehot[mine], dtype=np.float32)),
            tf.constant(lr, tf.float32),
            tf.constant(float(n), tf.float32),
            tf.constant(float(b), tf.float32),
        ]
        if digits is None:
            stats = _collective(lambda: self._step(*args))
        else:
            local = DigitTargets(digits.images[mine], digits.onehots[mine])
            stats = _collective(lambda: self._step_digits(*args, *digit_constants(local)))
        total = np.asarray(stats)
        return float(total[0]) / b, round(float(total[1]))

    def scores(self, images: np.ndarray, batch_size: int = 512) -> np.ndarray:
        """Every worker scores its share of `images`; all get all the scores. With batch norms, every worker
        first takes rank 0's moving statistics (the ones rank 0 saves: each worker updated its own copy,
        which TensorFlow does not merge, from the same global statistics, so they differ by rounding at
        most), so the scores are exactly the saved model's."""
        world = self.world
        for var in self.inner.model.non_trainable_variables:
            mine = np.asarray(var.numpy(), np.float32)
            var.assign(world.all_sum(mine if world.rank == 0 else np.zeros_like(mine)))
        part = rank_slice(len(images), world.rank, world.size)
        padded = np.zeros((len(images), self.inner.spec.num_classes), np.float32)
        padded[part] = self.inner.scores(images[part], batch_size)
        return world.all_sum(padded)

    def weights(self) -> dict[str, np.ndarray]:
        return self.inner.weights()

    def optimizer_state(self) -> dict[str, np.ndarray]:
        return self.inner.optimizer_state()

    def load_optimizer_state(self, state: Mapping[str, np.ndarray]) -> None:
        self.inner.load_optimizer_state(state)


def _ports(nproc: int, port: int | None) -> list[int]:
    """One port a worker: PORT, PORT+1, … when given (each checked free), else free ones."""
    import socket

    if port is not None:
        if port <= 65535 < port + nproc - 1:  # (the range check itself is check_port's)
            raise CapsctlError(
                f"--port {port}: Keras takes a port a rank, {port}..{port + nproc - 1} with --nproc {nproc}; "
                f"give a --port of at most {65536 - nproc}"
            )
        for p in range(port, port + nproc):
            check_port(p)
        return list(range(port, port + nproc))
    held = []
    try:
        for _ in range(nproc):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.bind(("127.0.0.1", 0))
            held.append(s)
        return [s.getsockname()[1] for s in held]
    finally:
        for s in held:
            s.close()


# a launcher told to stop (kill, a scheduler, the terminal closing) stops its workers first, as torchrun's
# agent does: they run in sessions of their own, so nothing else would reach them, and rank 0 would go on
# training and holding the run's lock
STOP_SIGNALS = (signal.SIGTERM, signal.SIGHUP)


class _Signalled(Exception):
    def __init__(self, signum: int) -> None:
        super().__init__(signum)
        self.name = signal.Signals(signum).name


def _raise_on(signals: tuple[signal.Signals, ...]) -> dict[signal.Signals, Any]:
    """Turn each signal into _Signalled in the main thread; the handlers replaced, to put back."""

    def handler(signum: int, frame: Any) -> None:
        for sig in signals:  # (a second one while the workers are being stopped waits for that)
            signal.signal(sig, signal.SIG_IGN)
        raise _Signalled(signum)

    try:
        return {sig: signal.signal(sig, handler) for sig in signals}
    except ValueError:  # (not the main thread: signals stay as they were)
        return {}


def visible_gpus(env: Mapping[str, str]) -> list[str]:
    """The GPU ids this machine shows a process: CUDA_VISIBLE_DEVICES when set, else those `nvidia-smi -L`
    lists ([] without a GPU or the tool). Asked without importing TensorFlow, which would take them."""
    if "CUDA_VISIBLE_DEVICES" in env:
        return [d.strip() for d in env["CUDA_VISIBLE_DEVICES"].split(",") if d.strip() and d.strip() != "-1"]
    try:
        listed = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, timeout=20, env=env)
    except (OSError, subprocess.SubprocessError):
        return []
    if listed.returncode != 0:
        return []
    gpus = [line for line in listed.stdout.splitlines() if line.startswith("GPU ")]
    return [str(i) for i in range(len(gpus))]


def worker_envs(nproc: int, env: Mapping[str, str], configs: list[str]) -> list[dict[str, str]]:
    """Each worker's environment: its TF_CONFIG and, on a machine with GPUs, one of them (in turn), as
    torch's ranks each take one: MultiWorkerMirroredStrategy makes a replica of every GPU a worker sees, so
    workers that each saw all of them were refused. Workers sharing a GPU allocate as they grow (TensorFlow
    takes nearly all of a GPU's memory for the first process otherwise)."""
    gpus = visible_gpus(env)
    out = []
    for rank in range(nproc):
        mine = dict(env, TF_CONFIG=configs[rank])
        if gpus:
            mine["CUDA_VISIBLE_DEVICES"] = gpus[rank % len(gpus)]
            if nproc > len(gpus):
                mine.setdefault("TF_FORCE_GPU_ALLOW_GROWTH", "true")
        out.append(mine)
    return out


def launch(nproc: int, argv: list[str], port: int | None) -> dict[int, int]:
    """Start `nproc` workers running `python -m capsctl *argv`, each with its TF_CONFIG; wait. When one
    fails, stop the others (SIGTERM, then SIGKILL after 5 s) and return every failed rank's exit code."""
    env = dict(os.environ, **{NPROC_JOB_ENV: "1"})
    workers: list[subprocess.Popen[bytes]] = []
    saved = _raise_on(STOP_SIGNALS)
    try:
        for worker_env in worker_envs(nproc, env, tf_configs(_ports(nproc, port))):
            # a session of its own: Ctrl-C reaches this launcher, which stops the workers
            command = [sys.executable, "-m", "capsctl", *argv]
            workers.append(subprocess.Popen(command, env=worker_env, start_new_session=True))
        while True:
            codes = [w.poll() for w in workers]
            if any(c not in (None, 0) for c in codes) or all(c == 0 for c in codes):
                break
            time.sleep(0.1)
    except (KeyboardInterrupt, _Signalled) as e:
        _stop(workers)
        name = e.name if isinstance(e, _Signalled) else "SIGINT"
        raise TrainingStopped(f"stopped by {name}; every rank was stopped", exit_code=130) from None
    finally:
        for sig, handler in saved.items():
            signal.signal(sig, handler)
    running = {r for r, code in enumerate(codes) if code is None}  # the ranks this launcher stops
    stuck = _stop(workers)
    exits = {r: UNRESPONSIVE_EXIT if r in stuck else int(w.returncode) for r, w in enumerate(workers)}
    # a rank ended by the launcher's own SIGTERM is not a cause: the rank that failed before it is
    stopped = {r for r in running if exits[r] == -signal.SIGTERM}
    return {r: code for r, code in exits.items() if code != 0 and r not in stopped}


def _stop(workers: list[subprocess.Popen[bytes]], grace_s: float = 5.0) -> set[int]:
    """SIGTERM to the workers still running; SIGKILL after `grace_s` to those that ignored it (a stopped
    or hung worker), whose ranks are returned."""
    for w in workers:
        if w.poll() is None:
            w.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + grace_s
    stuck = set()
    for rank, w in enumerate(workers):
        try:
            w.wait(max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            w.kill()
            w.wait()
            stuck.add(rank)
    return stuck
