"""`capsctl bench`'s measurements of one backend, run in a child process of its own
(`python -m capsctl.bench.measure NAME CONFIG OUT`), so torch and TensorFlow never share thread pools
or allocator state and peak RSS is per backend.

Everything goes through the Backend protocol (trainer.step, runner.scores, and bench_kernels() for
the few framework kernels the rest has no word for: a large sgemm, a naive loop-over-capsules routing).

Timing: after warm-up, `windows` timed windows; within a window every head runs the same number
of steps back to back, and the sgemm runs `SGEMM_REPS` times, so ratios (capsule / pool step,
achieved rate / sgemm rate) compare measurements taken seconds apart. Every figure is the median
over windows; a ratio is the median of the per-window ratios. Process CPU time is kept beside wall
time (`*_cpu`): under load the CPU-time ratios are the ones to compare.

The variant `capsule+decoder` (capsctl.bench.DECODER) is the capsule head with the reconstruction
decoder and its loss, trained through the same `trainer.step` as `capsctl train --decoder`. It is
timed right beside the plain capsule head (its reference, measured even when not asked for), the
two swapping places every other window (A B, then B A), so drift and noise hit both alike; its
ratio to the plain step is the median of the per-window ratios. It has no inference figures: the
decoder takes no part in class scores."""

from __future__ import annotations

import gc
import json
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from typing import Any

import numpy as np

from capsctl.backend import BenchKernels, OptimConfig, get_backend
from capsctl.bench import ARCH_PREFIX, DECODER, VARIANTS
from capsctl.choices import ARCHS
from capsctl.errors import CapsctlError
from capsctl.model import flops
from capsctl.model.spec import HEADS, DecoderSpec, ModelSpec, default_spec
from capsctl.model.weights import init_weights, parameter_count
from capsctl.training.loop import one_hot

INFER_SIZES = ((28, 28), (56, 28))  # single digits, and the vertical pairs of eval-pairs


SGEMM_REPS = 3  # matmuls per window


DECODER_HIDDEN = (512, 1024)  # the paper's decoder, as `capsctl train --decoder` adds it


def variant_size(name: str, image_size: tuple[int, int] | None = None) -> tuple[int, int]:
    """The training images' (height, width) of a variant: `image_size` when given (`--image-size`), else
    28x28, or an `arch:NAME` preset's design size."""
    if image_size is not None:
        return image_size
    if name.startswith(ARCH_PREFIX):
        from capsctl.model.presets import design_size

        return design_size(name[len(ARCH_PREFIX) :])
    return 28, 28


def variant_spec(name: str, image_size: tuple[int, int] | None = None) -> ModelSpec:
    """The seed model of a head, or of `capsule+decoder`: the capsule head with the decoder drawing the
    grey training images; or `arch:NAME`: that preset as `capsctl train --arch NAME` completes it for grey
    images of the variant's size (variant_size)."""
    h, w = variant_size(name, image_size)
    if name == DECODER:
        dec = DecoderSpec(hidden=DECODER_HIDDEN, image_shape=(h, w, 1))
        return default_spec("capsule").replace(decoder=dec)
    if name.startswith(ARCH_PREFIX):
        from capsctl.model.presets import for_images

        return for_images(name[len(ARCH_PREFIX) :], h, w)
    return default_spec(name)


def infer_sizes(image_size: tuple[int, int] | None) -> tuple[tuple[int, int], ...]:
    """The inference image sizes: single digits and the vertical pairs of eval-pairs (INFER_SIZES), or
    with `--image-size HxW` that size and two of them stacked (2H x W)."""
    if image_size is None:
        return INFER_SIZES
    h, w = image_size
    return (h, w), (2 * h, w)


@dataclass(frozen=True)
class BenchConfig:
    backends: tuple[str, ...] = ("torch", "keras")
    heads: tuple[str, ...] = VARIANTS  # heads, and the variant capsule+decoder
    batch: int = 128  # training images per step
    windows: int = 5  # timed windows (medians are taken over these)
    steps: int = 4  # training steps per head per window
    warmup: int = 3  # untimed training steps per head first
    infer_batch: int = 512  # images per inference batch
    infer_batches: int = 2  # inference batches per head, size and window
    sgemm: int = 2048  # side of the square float32 matmul that measures the machine's rate
    routing: bool = True  # also time naive vs vectorised routing (capsule head)
    image_size: tuple[int, int] | None = None  # (H, W) of every variant's images; None: 28x28, or a preset's

    def validate(self) -> None:
        for name, value, lo, hi in (
            ("--batch", self.batch, 1, 4096),
            ("--windows", self.windows, 1, 1000),
            ("--steps", self.steps, 1, 1000),
            ("--warmup", self.warmup, 0, 1000),
            ("--infer-batch", self.infer_batch, 1, 65536),
            ("--infer-batches", self.infer_batches, 1, 1000),
            ("--sgemm", self.sgemm, 16, 16384),
        ):
            if not lo <= value <= hi:
                raise CapsctlError(f"{name} must be in {lo}..{hi}, got {value}")
        if not self.backends:
            raise CapsctlError("--backend: give at least one backend")
        if not self.heads:
            raise CapsctlError("--head: give at least one head")
        for head in self.heads:
            if head.startswith(ARCH_PREFIX) and head[len(ARCH_PREFIX) :] in ARCHS:
                continue
            if head not in VARIANTS:
                raise CapsctlError(f"--head: unknown head {head!r} (expected {', '.join(VARIANTS)})")
        if self.image_size is not None:
            self._check_fit(self.image_size)

    def _check_fit(self, size: tuple[int, int]) -> None:
        """Every variant runs on grey `size` images (checked before any child process starts)."""
        from capsctl.model.fit import check_fit

        h, w = size
        images = np.zeros((1, h, w, 1), np.float32)
        for head in self.trained():
            label = head.removeprefix(ARCH_PREFIX) if head.startswith(ARCH_PREFIX) else f"the {head} head"
            try:
                check_fit(variant_spec(head, size), images, None, label, "images")
            except CapsctlError as e:  # (check_fit names the model; completing a preset's spec does not)
                said = str(e) if str(e).startswith(f"{label}: ") else f"{label}: {e}"
                raise CapsctlError(f"--image-size {h}x{w}: {said}") from None

    def trained(self) -> tuple[str, ...]:
        """The variants whose training steps are timed, in window order: capsule+decoder right after
        the plain capsule head, which is added as its reference if not asked for."""
        order = [h for h in self.heads if h != DECODER]
        if DECODER in self.heads:
            if "capsule" not in order:
                order.append("capsule")
            order.insert(order.index("capsule") + 1, DECODER)
        return tuple(order)


def window_order(trained: tuple[str, ...], window: int) -> list[str]:
    """The order of the variants in timed window `window`: capsule and capsule+decoder swap places every
    other window (A B, B A, ...); without the decoder variant, the order of `trained` every time."""
    order = list(trained)
    if window % 2 and DECODER in order and "capsule" in order:
        a, b = order.index("capsule"), order.index(DECODER)
        order[a], order[b] = order[b], order[a]
    return order


def decoder_trained(weights: dict[str, np.ndarray], spec: ModelSpec) -> bool:
    """Whether the decoder's loss reached its weights: the last layer's bias starts at zero and moves
    only by a gradient (weight decay leaves a zero at zero)."""
    assert spec.decoder is not None
    return bool(np.any(weights[f"decoder.dense{len(spec.decoder.hidden)}.bias"] != 0))


def median(values: list[float]) -> float:
    return float(statistics.median(values))


def peak_rss_mb() -> float | None:
    """Peak resident memory of this process (VmHWM: counts C allocations, unlike tracemalloc)."""
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024.0
    except OSError:
        pass
    try:
        import resource

        kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
        return kb / (1024.0 * 1024.0) if sys.platform == "darwin" else kb / 1024.0
    except (ImportError, OSError):
        return None


def reset_peak_rss() -> bool:
    """Reset VmHWM to the current RSS (Linux: write 5 to clear_refs), so phases are measured apart."""
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
        return True
    except OSError:
        return False


def _timed(fn: Callable[[], object], reps: int) -> float:
    t = time.perf_counter()
    for _ in range(reps):
        fn()
    return time.perf_counter() - t


def sgemm_fraction(work: float, step_s: list[float], sgemm_work: float, gemm_s: list[float]) -> float | None:
    """The median over windows of (work / step time) / (sgemm work / that window's sgemm time): the
    step's achieved rate as a fraction of the sgemm's (None without a timed window)."""
    ratios = [work * g / (t * sgemm_work) for t, g in zip(step_s, gemm_s, strict=True) if t > 0 and g > 0]
    return median(ratios) if ratios else None


def _timed2(fn: Callable[[], object], reps: int) -> tuple[float, float]:
    """(wall, process CPU) seconds per call."""
    c = time.process_time()
    wall = _timed(fn, reps)
    return wall / reps, (time.process_time() - c) / reps


def measure_backend(name: str, cfg: BenchConfig) -> dict[str, Any]:
    """All measurements of one backend, in this process. Returns a JSON-ready dict."""

    backend = get_backend(name)
    result: dict[str, Any] = {"backend": name, "available": True, "describe": backend.describe()}
    kernels = backend.bench_kernels()
    result["threads"] = kernels.threads()
    rng = np.random.default_rng(0)
    trained = cfg.trained()
    specs = {head: variant_spec(head, cfg.image_size) for head in trained}  # (decoder's weights drawn last)
    weights = {head: init_weights(spec, 0) for head, spec in specs.items()}
    sizes = {head: variant_size(head, cfg.image_size) for head in trained}
    # synthetic images, fed from memory (28x28 drawn first, as before other sizes existed)
    batches = {s: rng.random((cfg.batch, *s, 1), dtype=np.float32) for s in sorted(set(sizes.values()))}
    x = {head: batches[size] for head, size in sizes.items()}
    y = one_hot(rng.integers(0, 10, cfg.batch), 10)

    # training: heads interleaved window by window, with the sgemm beside them
    reset_peak_rss()
    rss_start = peak_rss_mb()
    trainers = {head: backend.trainer(spec, weights[head], OptimConfig()) for head, spec in specs.items()}
    for head, trainer in trainers.items():
        for _ in range(cfg.warmup):
            trainer.step(x[head], y, 1e-3)
    gemm = kernels.sgemm(cfg.sgemm)
    gemm()
    step_s: dict[str, list[float]] = {head: [] for head in trained}
    gemm_s: list[float] = []
    gemm_cpu: list[float] = []
    cpu_s: dict[str, list[float]] = {head: [] for head in trained}
    for window in range(cfg.windows):
        for head in window_order(trained, window):
            wall, cpu = _timed2(partial(trainers[head].step, x[head], y, 1e-3), cfg.steps)
            step_s[head].append(wall)
            cpu_s[head].append(cpu)
        wall, cpu = _timed2(gemm, SGEMM_REPS)
        gemm_s.append(wall)
        gemm_cpu.append(cpu)
    result["train_peak_rss_mb"] = peak_rss_mb()
    result["rss_before_train_mb"] = rss_start
    if DECODER in trainers:
        result["decoder_trained"] = decoder_trained(trainers[DECODER].weights(), specs[DECODER])
    del trainers
    gc.collect()
    sgemm_flops = 2.0 * cfg.sgemm**3
    sgemm_gflops = sgemm_flops / median(gemm_s) / 1e9 if gemm_s else None
    # per CPU-second: what one busy core does; the load-independent rate
    sgemm_cpu = sgemm_flops / median(gemm_cpu) / 1e9 if gemm_cpu and median(gemm_cpu) > 0 else None
    result["sgemm"] = {"n": cfg.sgemm, "gflops": sgemm_gflops, "gflops_per_cpu_s": sgemm_cpu}

    heads: dict[str, dict[str, Any]] = {}
    for head, spec in specs.items():
        step, cpu = median(step_s[head]), median(cpu_s[head])
        count = flops.count(spec, *sizes[head])
        achieved = count.train_step * cfg.batch / step / 1e9
        achieved_cpu = count.train_step * cfg.batch / cpu / 1e9 if cpu > 0 else None
        work = count.train_step * cfg.batch  # one step's FLOPs
        heads[head] = {
            "parameters": parameter_count(spec),
            "train_images_per_s": cfg.batch / step,
            "train_step_ms": step * 1e3,
            "train_step_cpu_ms": cpu * 1e3,
            "train_gflop_per_image": count.train_step / 1e9,
            "achieved_gflops": achieved,
            # the median of the per-window ratios (the step and the sgemm timed seconds apart), as the
            # module says every ratio is: a quotient of the two medians differs under load
            "sgemm_fraction": sgemm_fraction(work, step_s[head], sgemm_flops, gemm_s),
            "achieved_gflops_per_cpu_s": achieved_cpu,
            "sgemm_fraction_cpu": sgemm_fraction(work, cpu_s[head], sgemm_flops, gemm_cpu),
            "infer_images_per_s": {},
        }
    if "capsule" in specs and "pool" in specs:
        ratios = [c / p for c, p in zip(step_s["capsule"], step_s["pool"], strict=True)]
        ratio = median(ratios)
        result["capsule_step_ratio"] = ratio
        result["capsule_step_ratio_cpu"] = median(
            [c / p for c, p in zip(cpu_s["capsule"], cpu_s["pool"], strict=True) if p > 0] or [float("nan")]
        )
        # the pool head is 0.05% of the FLOPs, so its step is the trunk's step
        result["capsule_head_share"] = 1.0 - 1.0 / ratio
        caps = flops.count(specs["capsule"], *sizes["capsule"])
        result["capsule_head_flop_share"] = caps.head / caps.forward
    if DECODER in specs:
        result["decoder_step_ratio"] = median(
            [d / c for d, c in zip(step_s[DECODER], step_s["capsule"], strict=True)]
        )
        result["decoder_step_ratio_cpu"] = median(
            [d / c for d, c in zip(cpu_s[DECODER], cpu_s["capsule"], strict=True) if c > 0] or [float("nan")]
        )
        result["decoder_flop_ratio"] = (
            flops.count(specs[DECODER], *sizes[DECODER]).train_step
            / flops.count(specs["capsule"], *sizes["capsule"]).train_step
        )

    # inference at batch infer_batch, each size; heads interleaved (the heads asked for: the decoder
    # takes no part in class scores, and the capsule head added as its reference is not measured)
    inferred = [head for head in cfg.heads if head in HEADS]
    result["infer_peak_rss_mb"] = None
    if inferred:
        reset_peak_rss()
        runners = {head: backend.runner(specs[head], weights[head]) for head in inferred}
        n_img = cfg.infer_batch * cfg.infer_batches
        for h, w in infer_sizes(cfg.image_size):
            images = rng.random((n_img, h, w, 1), dtype=np.float32)
            times: dict[str, list[float]] = {head: [] for head in runners}
            for runner in runners.values():
                runner.scores(images[: cfg.infer_batch], cfg.infer_batch)  # warm-up (and tracing, per shape)
            for _ in range(cfg.windows):
                for head, runner in runners.items():
                    times[head].append(_timed(partial(runner.scores, images, cfg.infer_batch), 1))
            for head in runners:
                heads[head]["infer_images_per_s"][f"{h}x{w}"] = n_img / median(times[head])
        result["infer_peak_rss_mb"] = peak_rss_mb()
        del runners
        gc.collect()
    result["heads"] = heads

    if cfg.routing and "capsule" in cfg.heads:
        result["routing"] = _routing(kernels, specs["capsule"], weights["capsule"], cfg, sizes["capsule"])
    return result


def _routing(
    kernels: BenchKernels,
    spec: ModelSpec,
    weights: dict[str, np.ndarray],
    cfg: BenchConfig,
    size: tuple[int, int],
) -> dict[str, Any]:
    """Training step (forward + backward) of the capsule head alone: a loop over input capsules vs ours."""
    fns = kernels.routing_fns(spec, weights["head.capsule.kernel"], cfg.batch, size)
    for fn in fns.values():
        fn()
    times: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(cfg.windows):
        for k, fn in fns.items():
            times[k].append(_timed(fn, 1))
    out: dict[str, Any] = {f"{k}_ms": median(v) * 1e3 for k, v in times.items()}
    out["speedup"] = median([n / v for n, v in zip(times["naive"], times["vectorised"], strict=True)])
    out["batch"] = cfg.batch
    return out


def _child_main(argv: list[str]) -> int:
    name, cfg_json, out = argv
    fields: dict[str, Any] = {
        k: tuple(v) if isinstance(v, list) else v for k, v in json.loads(cfg_json).items()
    }
    cfg = BenchConfig(**fields)
    try:
        result = measure_backend(name, cfg)
    except CapsctlError as e:
        result = {"backend": name, "available": False, "reason": str(e)}
    with open(out, "w") as fh:
        json.dump(result, fh)
    return 0


if __name__ == "__main__":
    sys.exit(_child_main(sys.argv[1:]))
