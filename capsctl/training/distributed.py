"""Data-parallel training, the framework-free half: who this process is in a job, and the rules every
backend follows (docs/DISTRIBUTED.md).

A job is N processes (ranks) started by the framework's own launcher (`torchrun`; TF_CONFIG for
tf.distribute; or `capsctl train --nproc N`, which starts the same thing). Every rank walks the
single-process batch order (`config.batches`) and takes its slice (`rank_slice`) of every global
batch; augmentation is drawn for the whole global batch from the same seeds, so it does not depend on
N; the backend averages gradients so that N ranks at global batch B make the updates one process
makes at batch B. Rank 0 alone reads the checkpoint (and hands it to the others) and writes the run
folder.

The backend side is `Backend.distributed()`, an `Engine`; nothing here imports a framework."""

from __future__ import annotations

import json
import os
import socket
import sys
from collections.abc import Mapping
from typing import Any, Protocol, TextIO

import numpy as np

from capsctl.backend import OptimConfig, Trainer
from capsctl.errors import CapsctlError
from capsctl.model.spec import ModelSpec
from capsctl.training._launcher_env import LAUNCHER_ENV, launched
from capsctl.training.config import TrainConfig

TF_TASK_TYPES = ("chief", "worker")  # what MultiWorkerMirroredStrategy runs; no parameter servers here
MAX_NPROC = 64  # `capsctl train --nproc` starts processes on this machine: more is a typo, not a plan
# seconds a collective waits for the other ranks before the job stops (env CAPSCTL_DIST_TIMEOUT)
DEFAULT_TIMEOUT_S = 300
# what each framework's launcher sets in every worker: torchrun (and the elastic agent behind `--nproc`);
# TF_CONFIG for tf.distribute (TF's cluster resolvers, or `capsctl train --backend keras --nproc`)
# set by `capsctl train --nproc` in its ranks: a rank that lost contact with the others exits quietly
# with LOST_EXIT, and the launcher says in one line which rank failed (under torchrun each rank says it)
NPROC_JOB_ENV = "CAPSCTL_NPROC_JOB"
LOST_EXIT = 3  # another rank went away (its connection closed)
TIMEOUT_EXIT = 4  # another rank did not answer within timeout_s() (it hung)
# reported by a launcher for a rank it had to kill because it ignored SIGTERM (stopped or hung)
UNRESPONSIVE_EXIT = 5


class World(Protocol):
    """This process's place in a job, and the collectives the shared training loop needs."""

    rank: int  # 0..size-1; rank 0 writes the run folder
    size: int  # number of processes (world size)

    def broadcast_bytes(self, data: bytes | None) -> bytes:
        """Rank 0's `data` on every rank (the others pass None). Bytes, never pickles: what crosses
        between ranks is safetensors and JSON, read by the same strict parsers as files."""

    def trainer(self, spec: ModelSpec, weights: Mapping[str, np.ndarray], optim: OptimConfig) -> Trainer:
        """A trainer whose `step` gets the whole global batch, trains on this rank's slice and returns the
        global batch's mean loss and correct count; `scores` is shared out between the ranks."""

    def close(self) -> None: ...


class Engine(Protocol):
    """What `Backend.distributed()` returns: the framework's own engine, wrapped."""

    def join(self) -> World:
        """Join the job this process was started in (the launcher's environment)."""

    def launch(self, nproc: int, argv: list[str], port: int | None) -> dict[int, int]:
        """Run `python -m capsctl *argv` as `nproc` ranks on 127.0.0.1 (rendezvous on `port`, or a free
        one, NPROC_JOB_ENV set), through the framework's launcher; waits. The failed ranks' exit codes
        ({} when every rank succeeded), a negative code being the signal that killed the rank."""


def launched_rank(backend: str | None = None) -> int | None:
    """This process's rank in the job its launcher's environment names (`backend`'s launcher, or any),
    before joining it; None when not launched: torchrun's RANK, or TF_CONFIG's task in TF's order."""
    if launched("torch") and backend in (None, "torch"):
        try:
            return int(os.environ["RANK"])
        except ValueError:
            return None  # (join says what is wrong with it)
    if launched("keras") and backend in (None, "keras"):
        return parse_tf_config(os.environ["TF_CONFIG"])[0]
    return None


def launcher_backend() -> str | None:
    """The backend whose launcher started this process (torchrun: torch; TF_CONFIG: keras), if any."""
    return next((name for name in LAUNCHER_ENV if launched(name)), None)


def share_settings(
    world: World, settings: tuple[TrainConfig, ModelSpec] | None
) -> tuple[TrainConfig, ModelSpec]:
    """Rank 0's (TrainConfig, ModelSpec) on every rank, as JSON: on --resume the run folder is rank 0's
    alone (on its machine), so the other ranks take the run's settings from it, not from a folder."""
    sent = None
    if world.rank == 0:
        assert settings is not None
        sent = json.dumps({"config": settings[0].to_json(), "spec": settings[1].to_json()}).encode()
    got = json.loads(world.broadcast_bytes(sent))
    return TrainConfig.from_json(got["config"]), ModelSpec.from_json(got["spec"])


def lost_contact(gist: str, timed_out: bool, peer: str = "rank") -> BaseException:
    """What a rank raises when a collective failed because another rank died or hung: under `capsctl train
    --nproc` a quiet exit (LOST_EXIT / TIMEOUT_EXIT; the launcher tells the cause in one line), else one
    line of its own quoting the engine's `gist`."""
    from capsctl.errors import TrainingStopped

    if NPROC_JOB_ENV in os.environ:
        return SystemExit(TIMEOUT_EXIT if timed_out else LOST_EXIT)
    return TrainingStopped(
        f"lost contact with another {peer} ({gist}); this rank stops, the last checkpoint is kept"
    )


def timeout_s() -> float:
    raw = os.environ.get("CAPSCTL_DIST_TIMEOUT", str(DEFAULT_TIMEOUT_S))
    try:
        value = float(raw)
    except ValueError:
        value = -1.0
    if not 1 <= value <= 86400:
        raise CapsctlError(f"CAPSCTL_DIST_TIMEOUT must be seconds in 1..86400, got {raw!r}")
    return value


def check_nproc(nproc: int) -> None:
    if not 1 <= nproc <= MAX_NPROC:
        raise CapsctlError(f"--nproc must be in 1..{MAX_NPROC}, got {nproc}")


def check_port(port: int) -> None:
    """Refuse a rendezvous port that is out of range or already in use on 127.0.0.1."""
    if not 1 <= port <= 65535:
        raise CapsctlError(f"--port must be in 1..65535, got {port}")
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError as e:
            raise CapsctlError(
                f"--port {port}: cannot listen on 127.0.0.1:{port} ({e.strerror or e}); give another "
                "--port or leave it out for a free one"
            ) from None


def worker_argv(argv: list[str]) -> list[str]:
    """The command line each rank runs: this one without the launcher's own options."""
    out: list[str] = []
    skip = False
    for arg in argv:
        if skip:
            skip = False
            continue
        if arg in ("--nproc", "--port"):
            skip = True
            continue
        if arg.startswith(("--nproc=", "--port=")):
            continue
        out.append(arg)
    return out


def parse_tf_config(raw: str | None) -> tuple[int, int]:
    """(rank, size) from a TF_CONFIG; anything MultiWorkerMirroredStrategy could not run is one line.

    Ranks follow TF's own order: the chief (if the cluster names one) is rank 0, worker i is rank i
    (or i + 1 after a chief)."""
    if raw is None:
        raise CapsctlError("TF_CONFIG is not set: not a tf.distribute worker")
    try:
        config = json.loads(raw)
    except json.JSONDecodeError as e:
        raise CapsctlError(f"TF_CONFIG does not parse as JSON ({e.msg} at character {e.pos})") from None
    if not isinstance(config, dict) or not isinstance(config.get("cluster"), dict):
        raise CapsctlError(
            'TF_CONFIG needs a "cluster" object, e.g. {"cluster": {"worker": ["host:port", …]}, "task": …}'
        )
    cluster, task = config["cluster"], config.get("task")
    other = sorted(set(cluster) - set(TF_TASK_TYPES))
    if other:
        raise CapsctlError(
            f"TF_CONFIG: MultiWorkerMirroredStrategy runs chief and worker tasks only, not {', '.join(other)}"
        )
    for kind, addresses in cluster.items():
        ok = isinstance(addresses, list) and all(
            isinstance(a, str) and a.rpartition(":")[2].isdigit() and a.rpartition(":")[0] for a in addresses
        )
        if not ok or not addresses:
            raise CapsctlError(f'TF_CONFIG: cluster "{kind}" must be a list of "host:port" strings')
    if len(cluster.get("chief", [])) > 1:
        raise CapsctlError("TF_CONFIG: a cluster has at most one chief")
    if not isinstance(task, dict) or not isinstance(task.get("type"), str) or task["type"] not in cluster:
        kinds = ", ".join(cluster)
        raise CapsctlError(f'TF_CONFIG needs a "task" with a "type" among the cluster\'s ({kinds})')
    index = task.get("index")
    if not isinstance(index, int) or isinstance(index, bool) or not 0 <= index < len(cluster[task["type"]]):
        raise CapsctlError(
            f'TF_CONFIG: task "index" must be 0..{len(cluster[task["type"]]) - 1} for type {task["type"]!r}'
        )
    chiefs = len(cluster.get("chief", []))
    rank = 0 if task["type"] == "chief" else chiefs + index
    return rank, chiefs + len(cluster.get("worker", []))


def tf_configs(ports: list[int]) -> list[str]:
    """The local TF_CONFIG of each worker: one cluster of workers on 127.0.0.1, worker 0 the chief."""
    cluster = {"worker": [f"127.0.0.1:{p}" for p in ports]}
    return [
        json.dumps({"cluster": cluster, "task": {"type": "worker", "index": i}})
        for i in range(len(ports))
    ]


def rank_slice(n: int, rank: int, size: int) -> slice:
    """Rank `rank`'s part of a global batch of `n`: contiguous, sizes differing by at most one, the first
    `n % size` ranks one larger (numpy.array_split's rule). A rank may get none (n < size)."""
    base, extra = divmod(n, size)
    start = rank * base + min(rank, extra)
    return slice(start, start + base + (1 if rank < extra else 0))


def data_fingerprint(labels: np.ndarray, images: np.ndarray) -> tuple[int, int]:
    """(images, checksum of labels and first image): ranks that loaded different data must not train.
    The labels' part is datasets.data_key, what a resume checks; the first image is added here."""
    import zlib

    from capsctl.data.datasets import data_key

    n, crc = data_key(labels)
    if len(images):
        crc = zlib.crc32(np.ascontiguousarray(images[0]).tobytes(), crc)
    return n, crc


def then_line(resume: str | None) -> str:
    """How a failed job's line ends: the command that continues it, or (no checkpoint yet) what to do."""
    if resume is None:
        return "no checkpoint was written yet; run the same command again"
    return f"the last checkpoint is kept; continue with: {resume}"


def job_outcome(failed: dict[int, int], resume: str | None) -> tuple[int, str | None]:
    """(exit status, the launcher's one line or None) for a job whose failed ranks are `failed`.

    A rank killed by a signal is the cause; else a rank that failed with its own message (it said
    why: nothing to add); else every failed rank only lost contact (one hung or the network failed)."""
    if not failed:
        return 0, None
    # the launcher stops the other ranks with SIGTERM: a rank killed by another signal is the cause
    stuck = sorted(r for r, code in failed.items() if code == UNRESPONSIVE_EXIT)
    if stuck:  # the others noticed it had stopped answering; the launcher killed it
        return 1, (
            f"rank {stuck[0]} stopped answering (hung or stopped) and was killed; every rank was stopped; "
            f"{then_line(resume)}"
        )
    if TIMEOUT_EXIT in failed.values():  # a rank hung: the launcher killed it, the others timed out
        return 1, (
            f"a rank did not answer within CAPSCTL_DIST_TIMEOUT={timeout_s():.0f} s (hung or starved); "
            f"every rank was stopped; {then_line(resume)}"
        )
    told = sorted(r for r, code in failed.items() if code >= 0 and code != LOST_EXIT)
    # SIGTERM is how the launcher stops the other ranks once one failed: a cause only when nothing else is
    killed = sorted(
        (r for r, code in failed.items() if code < 0 and not (code == -15 and told)),
        key=lambda r: (failed[r] == -15, r),
    )
    if len(killed) > 1 and all(failed[r] == -15 for r in killed):
        # every rank ended by SIGTERM: torchrun's agent stops the others with it too, and reports them
        # alike (their timestamps are whole seconds), so which one was sent it first cannot be told
        return 1, f"the ranks were stopped by SIGTERM; {then_line(resume)}"
    if killed:
        return 1, failure_message(killed[0], failed[killed[0]], resume)
    if told:  # a rank said why (a one-line error, exit 2 for bad input): nothing to add
        return failed[told[0]], None
    return 1, f"the ranks lost contact with each other; {then_line(resume)}"


def failure_message(rank: int, code: int, resume: str | None) -> str:
    """The launcher's one line for a rank that failed without saying why (killed by a signal)."""
    if code < 0:
        import signal

        try:
            how = f"was killed by {signal.Signals(-code).name}"
        except ValueError:
            how = f"was killed by signal {-code}"
    else:
        how = f"exited with status {code}"
    return f"rank {rank} {how}; the other ranks were stopped; {then_line(resume)}"


class _RankPrefixed:
    """A text stream that starts every line it writes with `[rank R] ` (ranks > 0: their warnings and
    errors are told apart from rank 0's, which draws the progress bars)."""

    def __init__(self, stream: TextIO, rank: int) -> None:
        self._stream = stream
        self._prefix = f"[rank {rank}] "
        self._at_line_start = True

    def write(self, text: str | bytes) -> int:
        if not text:
            return 0
        if isinstance(text, bytes):  # click's echo writes bytes to a stream it takes for binary
            text = text.decode(getattr(self._stream, "encoding", None) or "utf-8", errors="replace")
        parts = text.split("\n")
        out = []
        for i, part in enumerate(parts):
            if part and self._at_line_start:
                out.append(self._prefix)
            out.append(part)
            if i < len(parts) - 1:
                out.append("\n")
                self._at_line_start = True
            elif part:
                self._at_line_start = False
        self._stream.write("".join(out))
        return len(text)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._stream, name)


def prefix_stderr(rank: int) -> None:
    """Prefix this rank's stderr lines (Python warnings, messages, errors) with its rank; rank 0 keeps
    its output as a single-process run's."""
    from capsctl.errors import set_rank

    set_rank(rank)
    if rank > 0 and not isinstance(sys.stderr, _RankPrefixed):
        sys.stderr = _RankPrefixed(sys.stderr, rank)


def told_errors(folder: str, nproc: int) -> list[str]:
    """The error lines the ranks left for the launcher (capsctl.errors.leave_to_launcher) that it must
    print: each rank's but 0's (which rank 0 printed itself), unless it is rank 0's line again."""
    lines: dict[int, str] = {}
    for rank in range(nproc):
        try:
            with open(os.path.join(folder, f"rank-{rank}.txt"), encoding="utf-8") as f:
                lines[rank] = f.read().strip()
        except OSError:
            continue
    first = lines.get(0)
    return [f"[rank {r}] {line}" for r, line in sorted(lines.items()) if r > 0 and line != first]


def share_tensors(
    world: World, tensors: Mapping[str, np.ndarray] | None, meta: Mapping[str, str] | None
) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    """Rank 0's tensors and metadata on every rank, sent as one safetensors blob."""
    from capsctl.model.weights import decode_safetensors, encode_safetensors

    blob = None
    if world.rank == 0:
        assert tensors is not None and meta is not None
        blob = encode_safetensors(tensors, meta)
    return decode_safetensors(world.broadcast_bytes(blob), "the start sent by rank 0")


def check_same_data(world: World, images: np.ndarray, labels: np.ndarray) -> None:
    import json

    mine = data_fingerprint(labels, images)
    sent = json.dumps(list(mine)).encode() if world.rank == 0 else None
    first = tuple(json.loads(world.broadcast_bytes(sent)))
    if first != mine:
        raise CapsctlError(
            f"rank {world.rank} loaded other training data than rank 0 ({mine[0]:,} images, rank 0 "
            f"{first[0]:,}, or other labels); every rank needs the same data set (--dataset, --data-dir)"
        )
