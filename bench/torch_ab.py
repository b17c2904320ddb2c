"""A/B of torch backend settings on the training step, each variant in its own process.

Variants run round-robin (round 1: A, B, C...; round 2: A, B, C...) so a machine whose load drifts
(this one is shared) hits every variant alike; per variant the median over rounds of its
per-step wall and CPU time is reported, and its ratio to the first variant.

    python bench/torch_ab.py --variants tuned,no-malloc,omp-active,old-routing --rounds 3 [--head capsule]

Variants: tuned (the backend as shipped), no-malloc (glibc defaults: no mallopt), omp-active
(OpenMP workers spin at barriers: OMP_WAIT_POLICY=ACTIVE), threads-1 (one intra-op thread),
old-routing (capsule head builds û and routes over it, as in the first release), fused-adam
(AdamW(fused=True)), compile (torch.compile of the model).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

from capsctl._script_args import check_counts
from capsctl.errors import run_script

VARIANTS = ("tuned", "no-malloc", "omp-active", "threads-1", "old-routing", "fused-adam", "compile")


def child(variant: str, head: str, batch: int, steps: int, warmup: int) -> dict[str, float]:
    import capsctl_torch  # noqa: F401  (sets the OpenMP policy first, as the CLI does)
    import numpy as np
    import torch
    from capsctl_torch import _layers, _trainer

    from capsctl.backend import OptimConfig
    from capsctl.model.spec import default_spec
    from capsctl.model.weights import init_weights
    from capsctl.training.loop import one_hot

    if variant == "no-malloc":
        _trainer.tune_malloc = lambda: False
    if variant == "threads-1":
        torch.set_num_threads(1)
    if variant == "old-routing":

        def forward(self, f, routings=None, trace=False):  # the first release's head: û, then routing over it
            v, cs, ags = _layers.route(
                self.predictions(f), routings or self.routings, self.routing, self.squash, trace
            )
            return _layers.safe_norm(v), cs, ags

        _layers.CapsuleHead.forward = forward
    spec = default_spec(head)
    tr = _trainer.TorchTrainer(spec, init_weights(spec, 0), OptimConfig())
    if variant == "fused-adam":
        tr.opt = torch.optim.AdamW(tr.model.parameters(), lr=1e-3, eps=1e-7, weight_decay=0.0, fused=True)
    if variant == "compile":
        tr.model = torch.compile(tr.model)
    rng = np.random.default_rng(0)
    x = rng.random((batch, 28, 28, 1), dtype=np.float32)
    y = one_hot(rng.integers(0, 10, batch), 10)
    for _ in range(warmup):
        tr.step(x, y, 1e-3)
    t, c = time.perf_counter(), time.process_time()
    for _ in range(steps):
        tr.step(x, y, 1e-3)
    return {
        "wall_ms": (time.perf_counter() - t) / steps * 1e3,
        "cpu_ms": (time.process_time() - c) / steps * 1e3,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--variants", default="tuned,no-malloc,omp-active,old-routing")
    ap.add_argument("--head", default="capsule")
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--child", help=argparse.SUPPRESS)
    args = ap.parse_args()
    check_counts(args, "rounds", "steps")
    if args.child:
        print(json.dumps(child(args.child, args.head, args.batch, args.steps, args.warmup)))
        return
    variants = [v for v in args.variants.split(",") if v]
    unknown = set(variants) - set(VARIANTS)
    if unknown:
        sys.exit(f"unknown variant(s) {sorted(unknown)}; known: {', '.join(VARIANTS)}")
    runs: dict[str, list[dict[str, float]]] = {v: [] for v in variants}
    load0 = os.getloadavg()[0]
    for _ in range(args.rounds):
        for v in variants:
            env = dict(os.environ)
            if v == "omp-active":
                env["OMP_WAIT_POLICY"] = "ACTIVE"
            cmd = [
                sys.executable,
                __file__,
                "--child",
                v,
                "--head",
                args.head,
                "--batch",
                str(args.batch),
                "--steps",
                str(args.steps),
                "--warmup",
                str(args.warmup),
            ]
            out = subprocess.run(cmd, env=env, capture_output=True, text=True, check=True).stdout
            runs[v].append(json.loads(out.strip().splitlines()[-1]))
    base = statistics.median(r["wall_ms"] for r in runs[variants[0]])
    print(
        f"head {args.head}, batch {args.batch}, {args.rounds} rounds x {args.steps} steps; "
        f"load average {load0:.1f} -> {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs"
    )
    for v in variants:
        wall = statistics.median(r["wall_ms"] for r in runs[v])
        cpu = statistics.median(r["cpu_ms"] for r in runs[v])
        rounds = ", ".join(f"{r['wall_ms']:.0f}" for r in runs[v])
        print(
            f"{v:12s} step {wall:7.1f} ms wall ({args.batch / wall * 1e3:6.0f} img/s), {cpu:7.1f} ms CPU, "
            f"{wall / base:5.2f} x {variants[0]}   rounds: {rounds}"
        )


if __name__ == "__main__":
    sys.exit(run_script(main))
