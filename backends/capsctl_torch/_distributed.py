"""Data-parallel training on torch.distributed: DistributedDataParallel in each rank, torch's elastic
launcher (what `torchrun` runs) for `capsctl train --nproc N`. The rules are capsctl.training.distributed's.

Process groups: the default group is always gloo (CPU tensors: the checkpoint hand-out, the metrics,
the evaluation); DDP's gradients go through nccl when every rank has a CUDA device, else gloo."""

from __future__ import annotations

import os
import sys
import uuid
from collections.abc import Callable, Mapping
from datetime import timedelta
from functools import partial
from typing import Any, TypeVar

import numpy as np
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

from capsctl._process_exit import skip_finalizing
from capsctl.backend import DigitTargets, OptimConfig, Trainer
from capsctl.errors import CapsctlError, TrainingStopped, is_out_of_memory
from capsctl.model.spec import ModelSpec
from capsctl.training.distributed import (
    NPROC_JOB_ENV,
    World,
    lost_contact,
    rank_slice,
    timeout_s,
)

from ._env import device
from ._layers import BatchNorm
from ._runner import batched_scores, to_input
from ._trainer import TorchTrainer, correct_rows, digit_tensors

T = TypeVar("T")


def _first_line(e: BaseException) -> str:
    """The gist of a c10d/gloo error: its first sentence, without the C++ source location."""
    import re

    text = (str(e).strip().splitlines() or [type(e).__name__])[0]
    text = re.sub(r"^\[[^\]]*\]\s*", "", text)
    return text.split(". ")[0][:200]


def _lost(e: BaseException) -> BaseException:
    timed_out = "timed out" in str(e).lower() or "timeout" in str(e).lower()
    return lost_contact(_first_line(e), timed_out)


def _collective(fn: Callable[[], T]) -> T:
    """Run a collective; a rank that died or timed out is one line, not a C++ traceback."""
    try:
        return fn()
    except RuntimeError as e:  # DistBackendError, DistNetworkError and gloo's errors are RuntimeErrors
        if is_out_of_memory(e):  # (so are the allocators': this rank's own failure, said as such)
            raise
        raise _lost(e) from None


class TorchWorld:
    def __init__(self, rank: int, size: int, local_rank: int, cuda: bool) -> None:
        self.rank, self.size, self.local_rank, self.cuda = rank, size, local_rank, cuda
        # DDP's gradients: nccl between GPUs; the default gloo group otherwise
        self.grad_group: Any = dist.new_group(backend="nccl") if cuda else None

    def broadcast_bytes(self, data: bytes | None) -> bytes:
        size = torch.tensor([len(data) if data is not None else 0], dtype=torch.int64)
        _collective(lambda: dist.broadcast(size, src=0))
        if self.rank == 0:
            assert data is not None
            buf = (
                torch.frombuffer(bytearray(data), dtype=torch.uint8)
                if data
                else torch.empty(0, dtype=torch.uint8)
            )
        else:
            buf = torch.empty(int(size[0]), dtype=torch.uint8)
        _collective(lambda: dist.broadcast(buf, src=0))
        return buf.numpy().tobytes()

    def trainer(self, spec: ModelSpec, weights: Mapping[str, np.ndarray], optim: OptimConfig) -> Trainer:
        return DistributedTorchTrainer(spec, weights, optim, self)

    def close(self) -> None:
        if dist.is_initialized():
            dist.destroy_process_group()


def join() -> World:
    env = os.environ
    try:
        rank, size = int(env["RANK"]), int(env["WORLD_SIZE"])
        local_rank = int(env.get("LOCAL_RANK", "0"))
    except (KeyError, ValueError):
        raise CapsctlError("RANK, WORLD_SIZE, LOCAL_RANK: not a torchrun environment") from None
    timeout = timedelta(seconds=timeout_s())
    try:
        dist.init_process_group("gloo", rank=rank, world_size=size, timeout=timeout)
    except (RuntimeError, ValueError) as e:
        first = _first_line(e)
        raise CapsctlError(f"cannot join the job as rank {rank} of {size} ({first})") from None
    # gloo's worker threads outlive the group (destroy_process_group leaves them running): whatever ends
    # this rank, it must not finalize Python under them (capsctl._process_exit)
    skip_finalizing()
    has_cuda = torch.cuda.is_available()
    flags = torch.tensor([int(has_cuda), int(has_cuda)], dtype=torch.int64)
    flags[1] = -flags[1]
    _collective(lambda: dist.all_reduce(flags, op=dist.ReduceOp.MAX))
    every, some = -int(flags[1]) == 1, int(flags[0]) == 1
    if some and not every:
        dist.destroy_process_group()
        raise CapsctlError(
            "some ranks have a CUDA device and some do not; give every rank one, or hide them all "
            "(CUDA_VISIBLE_DEVICES='') to train on the CPUs"
        )
    if every:
        torch.cuda.set_device(local_rank % torch.cuda.device_count())
    return TorchWorld(rank, size, local_rank, every)


class _SumOverRanks(torch.autograd.Function):
    """Σ of a tensor over the ranks, differentiable: every rank uses the sum, so the gradient reaching a
    rank's summand is the sum of every rank's gradient of the sum (what torch's SyncBatchNorm does)."""

    @staticmethod
    def forward(ctx: Any, t: torch.Tensor, group: Any) -> torch.Tensor:
        ctx.group = group
        total = t.clone()
        dist.all_reduce(total, group=group)
        return total

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        total = grad.clone()
        dist.all_reduce(total, group=ctx.group)
        return total, None


def sum_over_ranks(t: torch.Tensor, group: Any = None) -> torch.Tensor:
    return _SumOverRanks.apply(t, group)


class _Loss(torch.nn.Module):
    """The model with its loss, as one module: DDP wraps what the step calls."""

    def __init__(self, inner: TorchTrainer) -> None:
        super().__init__()
        self.model = inner.model
        self._loss = inner.loss

    def forward(self, *inputs: Any) -> tuple[torch.Tensor, torch.Tensor]:
        # TorchTrainer.loss's arguments, passed on as they are: one signature to keep, not two
        return self._loss(*inputs)


class DistributedTorchTrainer:
    """A TorchTrainer whose gradients DDP averages: each rank trains on its slice of the global batch."""

    def __init__(
        self, spec: ModelSpec, weights: Mapping[str, np.ndarray], optim: OptimConfig, world: TorchWorld
    ) -> None:
        self.inner = TorchTrainer(spec, weights, optim)
        self.world = world
        # batch norms normalise with the global batch's statistics, as one process does: torch's
        # SyncBatchNorm would, but it runs on GPUs only
        self.batch_norms = [m for m in self.inner.model.modules() if isinstance(m, BatchNorm)]
        for bn in self.batch_norms:
            bn.sum_over_ranks = partial(sum_over_ranks, group=world.grad_group)
        ids = [torch.cuda.current_device()] if world.cuda else None
        # every rank starts from the same weights already (rank 0's checkpoint, handed out); DDP checks
        # the shapes and broadcasts them once more
        self.ddp = _collective(
            lambda: DistributedDataParallel(_Loss(self.inner), device_ids=ids, process_group=world.grad_group)
        )

    def step(
        self, x: np.ndarray, y_onehot: np.ndarray, lr: float, digits: DigitTargets | None = None
    ) -> tuple[float, int]:
        inner, world = self.inner, self.world
        b = len(x)
        part = rank_slice(b, world.rank, world.size)
        n = part.stop - part.start
        # a rank with no images in a short last batch still takes part, with one image weighted 0
        mine = part if n else slice(0, 1)
        xs, ys = x[mine], y_onehot[mine]
        if digits is not None:
            digits = DigitTargets(digits.images[mine], digits.onehots[mine])
        for group in inner.opt.param_groups:
            group["lr"] = lr
        y = torch.from_numpy(ys).to(device())
        for bn in self.batch_norms:
            bn.counts = n > 0
        loss, p = _collective(lambda: self.ddp(to_input(xs), y, *digit_tensors(digits)))
        inner.opt.zero_grad(set_to_none=True)
        # DDP averages the ranks' gradients of their mean losses: weighting rank r's by n_r·N/B makes that
        # the gradient of the global batch's mean loss (weight exactly 1 when the slices are equal)
        weight = n * world.size / b
        _collective(lambda: (loss * weight if weight != 1 else loss).backward())
        inner.opt.step()
        correct = int(correct_rows(p.detach(), y).sum()) if n else 0
        stats = torch.tensor([float(loss.detach()) * n, correct], dtype=torch.float64)
        _collective(lambda: dist.all_reduce(stats))
        return float(stats[0]) / b, round(float(stats[1]))

    def scores(self, images: np.ndarray, batch_size: int = 512) -> np.ndarray:
        """Every rank scores its share of `images`; all get all the scores. With batch norms, every rank
        first takes rank 0's running statistics (the ones rank 0 saves): every rank updated its own from
        the same global statistics, so they differ by rounding at most, and the scores are exactly the
        saved model's."""
        world = self.world
        for buffer in self.inner.model.buffers():
            _collective(partial(dist.broadcast, buffer, src=0))
        parts = [rank_slice(len(images), r, world.size) for r in range(world.size)]
        local = batched_scores(self.inner.model, images[parts[world.rank]], batch_size)
        rows = max(p.stop - p.start for p in parts)
        padded = torch.zeros((rows, self.inner.spec.num_classes), dtype=torch.float32)
        padded[: len(local)] = torch.from_numpy(local)
        gathered = [torch.empty_like(padded) for _ in range(world.size)]
        _collective(lambda: dist.all_gather(gathered, padded))
        return np.concatenate([g[: p.stop - p.start].numpy() for g, p in zip(gathered, parts, strict=True)])

    def weights(self) -> dict[str, np.ndarray]:
        return self.inner.weights()

    def optimizer_state(self) -> dict[str, np.ndarray]:
        return self.inner.optimizer_state()

    def load_optimizer_state(self, state: Mapping[str, np.ndarray]) -> None:
        self.inner.load_optimizer_state(state)


def launch(nproc: int, argv: list[str], port: int | None) -> dict[int, int]:
    import dataclasses
    import logging

    from torch.distributed.elastic.multiprocessing.api import DefaultLogsSpecs, SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    env = os.environ
    # one thread per rank unless told: the ranks share this machine's cores (torchrun does the same)
    env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // nproc)))
    env[NPROC_JOB_ENV] = "1"
    settings: dict[str, Any] = {
        "min_nodes": 1,
        "max_nodes": 1,
        "nproc_per_node": nproc,
        "run_id": f"capsctl-{uuid.uuid4().hex[:12]}",
        "rdzv_backend": "c10d",
        "rdzv_endpoint": f"127.0.0.1:{port or 0}",
        "rdzv_configs": {"is_host": True},  # a port taken meanwhile fails, never joins another job
        "max_restarts": 0,  # a rank that fails stops the job: --resume continues it
        "monitor_interval": 0.1,
        "start_method": "spawn",
        "local_addr": "127.0.0.1",
        "logs_specs": DefaultLogsSpecs(),
        # the others get SIGTERM, which ends a rank at once (no handler); a hung one gets SIGKILL after this
        "shutdown_timeout": 5,
    }
    known = {f.name for f in dataclasses.fields(LaunchConfig)}  # (older torch lacks the last fields)
    config = LaunchConfig(**{k: v for k, v in settings.items() if k in known})
    # a failure is told in one line by the caller, not a log dump
    names = ["torch.distributed.elastic"]
    names += [n for n in logging.root.manager.loggerDict if n.startswith("torch.distributed.elastic.")]
    levels = {name: logging.getLogger(name).level for name in names}
    for name in names:
        logging.getLogger(name).setLevel(logging.CRITICAL)
    try:
        elastic_launch(config, sys.executable)("-m", "capsctl", *argv)
    except ChildFailedError as e:
        return {rank: int(failure.exitcode) for rank, failure in e.failures.items()}
    except SignalException as e:
        raise TrainingStopped(
            f"stopped by {e.sigval.name}; every rank was stopped",
            exit_code=130,
        ) from None
    except Exception as e:  # the rendezvous (its port) failed before any rank ran
        first = _first_line(e)
        raise CapsctlError(f"cannot start {nproc} ranks on 127.0.0.1 ({first})") from None
    finally:
        for name, level in levels.items():
            logging.getLogger(name).setLevel(level)
    return {}
