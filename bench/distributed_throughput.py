"""Data-parallel training on one machine: images/s of the default capsule model in three layouts, and the
cost of the gradient all-reduce alone (docs/DISTRIBUTED.md).

    python bench/distributed_throughput.py --backend keras            # about 5 minutes on 2 cores
    python bench/distributed_throughput.py --backend keras --json out.json

Layouts: 1 process × all threads, 1 process × 1 thread, N processes × 1 thread (`capsctl train --nproc N`),
global batch 64 on the first 1,280 mnist-5k digits, 2 epochs; the figure is epoch 2's training images/s
(epoch 1 includes start-up and compiling). Threads are pinned with OMP_NUM_THREADS (torch) and
TF_NUM_INTRAOP_THREADS / TF_NUM_INTEROP_THREADS (TensorFlow). The all-reduce: N workers sum a float32
vector as long as the model's parameters (279,488) through the engine the trainer uses (keras: the
strategy's all-reduce, as the optimiser runs it; torch: gloo's all_reduce), 30 times after 5 warm-ups;
median ms per call. Never run this beside another job.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from capsctl._io import atomic_write_bytes
from capsctl._script_args import check_counts, check_json_out
from capsctl.bench.machine import machine
from capsctl.errors import run_script

PARAMS = 279_488  # the default capsule model's parameter count


def _threads_env(threads: int | None) -> dict[str, str]:
    env = dict(os.environ)
    for name in ("TF_CONFIG", "RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(name, None)
    if threads is not None:
        env.update(OMP_NUM_THREADS=str(threads), TF_NUM_INTRAOP_THREADS=str(threads))
        env["TF_NUM_INTEROP_THREADS"] = "1"
    return env


def layout(backend: str, nproc: int, threads: int | None) -> float:
    with tempfile.TemporaryDirectory(prefix="capsctl-dist-") as tmp:
        cmd = [sys.executable, "-m", "capsctl", "train", "--backend", backend, "--limit", "1280",
               "--batch-size", "64", "--epochs", "2", "--eval-limit", "100", "--curve-images", "100",
               "--out", str(Path(tmp) / "run"), "-q"]
        if nproc > 1:
            cmd += ["--nproc", str(nproc)]
        subprocess.run(cmd, check=True, env=_threads_env(threads), capture_output=True)
        rows = [json.loads(line) for line in (Path(tmp) / "run" / "metrics.jsonl").read_text().splitlines()]
    return float(rows[-1]["images_per_s"])


def _allreduce_worker(backend: str) -> None:
    """One worker of the all-reduce timing (started by `allreduce`); rank 0 prints the median ms."""
    import numpy as np

    from capsctl.backend import get_backend

    world = get_backend(backend).distributed().join()
    x = np.ones(PARAMS, np.float32)
    if backend == "keras":
        def once() -> None:
            world.all_sum(x)  # type: ignore[attr-defined]
    else:
        import torch
        import torch.distributed as dist

        t = torch.from_numpy(x)

        def once() -> None:
            dist.all_reduce(t)
    for _ in range(5):
        once()
    times = []
    for _ in range(30):
        t0 = time.perf_counter()
        once()
        times.append((time.perf_counter() - t0) * 1000)
    if world.rank == 0:
        print(json.dumps({"allreduce_ms": statistics.median(times), "min_ms": min(times)}))
    world.close()


def allreduce(backend: str, nproc: int) -> dict[str, float]:
    import socket

    from capsctl.training.distributed import tf_configs

    ports = []
    for _ in range(nproc):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            ports.append(s.getsockname()[1])
    jobs = []
    for rank in range(nproc):
        env = _threads_env(1)
        if backend == "keras":
            env["TF_CONFIG"] = tf_configs(ports)[rank]
        else:
            env.update(RANK=str(rank), WORLD_SIZE=str(nproc), MASTER_ADDR="127.0.0.1")
            env["MASTER_PORT"] = str(ports[0])
        jobs.append(subprocess.Popen([sys.executable, __file__, "--worker", backend], env=env,
                                     stdout=subprocess.PIPE, text=True))
    outs = [job.communicate(timeout=300)[0] for job in jobs]
    return dict(json.loads(outs[0].strip().splitlines()[-1]))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--backend", choices=["torch", "keras"], default="keras")
    ap.add_argument("--nproc", type=int, default=2)
    ap.add_argument("--json", type=Path)
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    args = ap.parse_args()
    check_counts(args, "nproc", least=2)
    check_json_out(args.json)
    if args.worker:
        _allreduce_worker(args.worker)
        return
    result: dict[str, object] = {"backend": args.backend, "machine": machine(), "batch": 64}
    cores = os.cpu_count() or 1
    for name, nproc, threads in ((f"1x{cores}", 1, None), ("1x1", 1, 1), (f"{args.nproc}x1", args.nproc, 1)):
        ips = layout(args.backend, nproc, threads)
        result[name] = {"images_per_s": ips, "ms_per_global_step": 64 / ips * 1000}
        print(f"{name:>6}: {ips:7.1f} img/s  {64 / ips * 1000:7.1f} ms per global step", flush=True)
    result["allreduce"] = allreduce(args.backend, args.nproc)
    print(f"all-reduce of {PARAMS:,} float32 across {args.nproc} workers: {result['allreduce']}")
    if args.json:
        atomic_write_bytes(args.json, json.dumps(result, indent=2).encode())


if __name__ == "__main__":
    sys.exit(run_script(main))
