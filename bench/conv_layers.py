"""Where a training step's time goes on this CPU: each trunk convolution's forward and backward rate
against the framework's own 2048³ sgemm, layer by layer, in torch (oneDNN, channels-last) and in
TensorFlow (NHWC, as Keras runs it).

    python bench/conv_layers.py                   # both frameworks, batch 128, median of 7
    python bench/conv_layers.py --frameworks torch --batch 32

The seed trunk's four 3x3 valid convolutions hold ~99% of a step's FLOPs, so their rate bounds the
whole step's. Each framework runs in its own child process (no shared thread pools). Never run this
beside another job.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from collections.abc import Callable

from capsctl._io import atomic_write_bytes
from capsctl._script_args import check_counts, check_json_out
from capsctl.errors import CapsctlError, run_script

# (in channels, out channels, input side) of the seed trunk at 28x28: Conv64-Conv64-AvgPool2-Conv128-Conv128
LAYERS = ((1, 64, 28), (64, 64, 26), (64, 128, 12), (128, 128, 10))


def _median_ms(f: Callable[[], object], n: int) -> float:
    for _ in range(2):
        f()
    times = []
    for _ in range(n):
        t = time.perf_counter()
        f()
        times.append(time.perf_counter() - t)
    return statistics.median(times) * 1e3


def _macs(batch: int, cin: int, cout: int, side: int) -> int:
    return batch * cout * cin * 9 * (side - 2) ** 2


def measure_torch(batch: int, n: int) -> dict:
    import torch
    import torch.nn.functional as F

    rows = []
    for cin, cout, side in LAYERS:
        first = cin == 1  # no gradient for the network's input
        x = (
            torch.randn(batch, cin, side, side)
            .to(memory_format=torch.channels_last)
            .requires_grad_(not first)
        )
        w = (torch.randn(cout, cin, 3, 3) * 0.1).to(memory_format=torch.channels_last).requires_grad_()
        g = torch.ones_like(F.conv2d(x, w))
        fwd = _median_ms(lambda x=x, w=w: F.conv2d(x, w), n)
        wrt = [w] if first else [x, w]
        both = _median_ms(lambda x=x, w=w, g=g, wrt=wrt: torch.autograd.grad(F.conv2d(x, w), wrt, g), n)
        rows.append(_row(batch, cin, cout, side, fwd, both, first))
    a = torch.randn(2048, 2048)
    sgemm = 2 * 2048**3 / _median_ms(lambda: a @ a, n) / 1e6
    # the whole trunk as a step runs it: convolutions with bias, ReLU, the average pool
    ws = [
        (torch.randn(co, ci, 3, 3) * 0.1).to(memory_format=torch.channels_last).requires_grad_()
        for ci, co, _ in LAYERS
    ]
    bs = [torch.zeros(co, requires_grad=True) for _, co, _ in LAYERS]
    x0 = torch.rand(batch, 1, 28, 28).to(memory_format=torch.channels_last)

    def trunk() -> torch.Tensor:
        h = x0
        for i, (w, b) in enumerate(zip(ws, bs, strict=True)):
            h = F.relu(F.conv2d(h, w, b))
            if i == 1:
                h = F.avg_pool2d(h, 2)
        return h

    g = torch.ones_like(trunk())
    return {
        "framework": f"torch {torch.__version__}",
        "threads": torch.get_num_threads(),
        "sgemm": sgemm,
        "layers": rows,
        "trunk_train_ms": _median_ms(lambda: torch.autograd.grad(trunk(), ws + bs, g), n),
    }


def measure_tf(batch: int, n: int) -> dict:
    import tensorflow as tf

    rows = []
    for cin, cout, side in LAYERS:
        first = cin == 1
        x = tf.Variable(tf.random.normal((batch, side, side, cin)))
        w = tf.Variable(tf.random.normal((3, 3, cin, cout)) * 0.1)

        @tf.function
        def fwd_fn(x=x, w=w):
            return tf.nn.conv2d(x, w, 1, "VALID")

        @tf.function
        def both_fn(x=x, w=w, first=first):
            with tf.GradientTape() as tape:
                y = tf.nn.conv2d(x, w, 1, "VALID")
            return tape.gradient(y, [w] if first else [x, w])

        fwd = _median_ms(lambda f=fwd_fn: f().numpy(), n)
        both = _median_ms(lambda f=both_fn: [t.numpy() for t in f()], n)
        rows.append(_row(batch, cin, cout, side, fwd, both, first))
    a = tf.random.normal((2048, 2048))
    mm = tf.function(lambda: tf.matmul(a, a))
    sgemm = 2 * 2048**3 / _median_ms(lambda: mm().numpy(), n) / 1e6
    ws = [tf.Variable(tf.random.normal((3, 3, ci, co)) * 0.1) for ci, co, _ in LAYERS]
    bs = [tf.Variable(tf.zeros((co,))) for _, co, _ in LAYERS]
    x0 = tf.random.uniform((batch, 28, 28, 1))

    @tf.function
    def trunk_fn():
        with tf.GradientTape() as tape:
            h = x0
            for i, (w, b) in enumerate(zip(ws, bs, strict=True)):
                h = tf.nn.relu(tf.nn.bias_add(tf.nn.conv2d(h, w, 1, "VALID"), b))
                if i == 1:
                    h = tf.nn.avg_pool2d(h, 2, 2, "VALID")
        return tape.gradient(h, ws + bs)

    return {
        "framework": f"tensorflow {tf.__version__}",
        "sgemm": sgemm,
        "layers": rows,
        "trunk_train_ms": _median_ms(lambda: [t.numpy() for t in trunk_fn()], n),
    }


def _row(batch: int, cin: int, cout: int, side: int, fwd: float, both: float, first: bool) -> dict:
    macs = _macs(batch, cin, cout, side)
    passes = 2 if first else 3  # forward + weight gradient (+ input gradient)
    return {
        "layer": f"{cin}->{cout} @{side}x{side}",
        "forward_ms": fwd,
        "forward_gflops": 2 * macs / fwd / 1e6,
        "train_ms": both,
        "train_gflops": 2 * passes * macs / both / 1e6,
        "train_share_of_flops": passes * macs,
    }


def child(framework: str, batch: int, n: int) -> None:
    out = measure_torch(batch, n) if framework == "torch" else measure_tf(batch, n)
    print(json.dumps(out))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--frameworks", default="torch,tensorflow", help="torch, tensorflow, or both")
    ap.add_argument("--batch", type=int, default=128, help="images per timed step (default: 128)")
    ap.add_argument("--n", type=int, default=7, help="timed repetitions of each layer (default: 7)")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    ap.add_argument("--json", help="write the figures to this file")
    args = ap.parse_args()
    check_counts(args, "batch", "n")
    unknown = set(args.frameworks.split(",")) - {"torch", "tensorflow"}
    if unknown:  # (anything but torch ran TensorFlow, and was reported as it)
        raise CapsctlError(f"--frameworks: {', '.join(sorted(unknown))} is not torch or tensorflow")
    check_json_out(args.json)
    if args.child:
        child(args.child, args.batch, args.n)
        return 0
    from capsctl.bench.machine import machine

    results = []
    for fw in args.frameworks.split(","):
        p = subprocess.run(
            [sys.executable, __file__, "--child", fw, "--batch", str(args.batch), "--n", str(args.n)],
            check=True,
            capture_output=True,
            text=True,
        )
        r = json.loads(p.stdout.strip().splitlines()[-1])
        results.append(r)
        total_ms = sum(x["train_ms"] for x in r["layers"])
        total_flop = sum(2 * x["train_share_of_flops"] for x in r["layers"])
        print(f"{r['framework']}: sgemm 2048³ {r['sgemm']:.0f} GFLOP/s; batch {args.batch}")
        for x in r["layers"]:
            print(
                f"  {x['layer']:>16}  forward {x['forward_ms']:6.1f} ms {x['forward_gflops']:5.0f} GF/s "
                f"({x['forward_gflops'] / r['sgemm']:4.0%})   fwd+bwd {x['train_ms']:6.1f} ms "
                f"{x['train_gflops']:5.0f} GF/s ({x['train_gflops'] / r['sgemm']:4.0%})"
            )
        rate = total_flop / total_ms / 1e6
        print(
            f"  all four, fwd+bwd: {total_ms:.0f} ms, {rate:.0f} GF/s = {rate / r['sgemm']:.0%} of sgemm; "
            f"{args.batch / total_ms * 1e3:.0f} img/s if the convolutions were the whole step"
        )
        t = r["trunk_train_ms"]
        print(
            f"  the trunk with bias, ReLU and pool, fwd+bwd: {t:.0f} ms = {t / total_ms:.2f} x the bare "
            f"convolutions; {args.batch / t * 1e3:.0f} img/s if the trunk were the whole step"
        )
    if args.json:
        report = {"machine": machine(), "batch": args.batch, "results": results}
        atomic_write_bytes(args.json, json.dumps(report, indent=1).encode())
    return 0


if __name__ == "__main__":
    sys.exit(run_script(main))
