"""`capsctl bench`."""

from typing import Annotated, Any

import typer

from capsctl.bench import DECODER, VARIANTS
from capsctl.choices import BUILTIN_BACKENDS
from capsctl.cli._options import (
    Arch,
    JsonOpt,
    _choice,
    backends_option,
    given,
    names_option,
    old_name,
    renamed,
)

Variant = _choice("Variant", VARIANTS)  # the heads, and capsule+decoder
_HEADS = list(VARIANTS)
_BACKENDS = list(BUILTIN_BACKENDS)


def bench(
    ctx: typer.Context,
    backends: Annotated[
        list[str], backends_option("--backends", "-b", help="Backends to measure.")
    ] = _BACKENDS,
    backend: Annotated[list[str] | None, backends_option("--backend", help="", hidden=True)] = None,
    heads: Annotated[
        list[str],
        names_option(
            Variant,
            "--heads",
            help=f"Heads to measure; {DECODER}: the capsule head with the reconstruction decoder, "
            "timed beside the plain capsule head (training only).",
        ),
    ] = _HEADS,
    head: Annotated[list[str] | None, names_option(Variant, "--head", help="", hidden=True)] = None,
    arch: Annotated[
        list[str] | None,
        names_option(
            Arch,
            "--arch",
            help="Architectures to measure (training: parameters, images/s, FLOP rate): seed, sabour2017, "
            "efficient, efficient-multimnist (on 36x36 images); measured instead of --heads unless --heads "
            "is given too.",
        ),
    ] = None,
    batch_size: Annotated[int, typer.Option("--batch-size", help="Training images per step.")] = 128,
    batch: Annotated[int | None, old_name("--batch")] = None,
    windows: Annotated[int, typer.Option(help="Timed windows; every figure is the median over them.")] = 5,
    steps: Annotated[int, typer.Option(help="Training steps per head in each window.")] = 4,
    warmup: Annotated[int, typer.Option(help="Untimed training steps per head first.")] = 3,
    infer_batch_size: Annotated[
        int, typer.Option("--infer-batch-size", help="Images per inference batch.")
    ] = 512,
    infer_batch: Annotated[int | None, old_name("--infer-batch")] = None,
    infer_batches: Annotated[
        int, typer.Option(help="Inference batches per head, image size and window.")
    ] = 2,
    sgemm: Annotated[
        int, typer.Option(help="Side of the square float32 matmul that measures the machine's rate.")
    ] = 2048,
    routing: Annotated[
        bool,
        typer.Option(
            "--routing/--no-routing", help="Also time a naive loop-over-capsules routing beside ours."
        ),
    ] = True,
    image_size: Annotated[
        str | None,
        typer.Option(
            "--image-size",
            metavar="HxW",
            help="Train (and infer) every model on grey HxW images instead of 28x28 (an --arch preset: "
            "instead of its design size), as your own data set's size; inference also times 2H x W. "
            "A model the size doesn't fit is refused.",
        ),
    ] = None,
    json_out: JsonOpt = False,
) -> None:
    """Measure training and inference speed of each backend × head on this machine.

    Training images/s (28×28, synthetic images fed from memory), inference images/s (28×28 and
    56×28), the capsule head's share of a training step, peak memory, and the achieved GFLOP/s of a
    training step (FLOPs counted from the model spec) as a fraction of a large float32 matmul's rate
    measured in the same run. Each backend runs in its own process. Figures are medians over
    --windows; ratios compare measurements taken back to back. CPU time is measured too: on a
    machine busy with other work, compare the per-CPU-second figures. Takes a few minutes.

    capsule+decoder: the training step of the capsule head with the reconstruction decoder (hidden
    512, 1024) and its loss, as `capsctl train --decoder` runs it, against the plain capsule step
    (interleaved, median of per-window ratios; target ≤ 1.15×). `--heads capsule+decoder` runs only
    that comparison.

    --arch sabour2017,efficient measures those architectures' training steps (parameters, images/s,
    FLOP rate against the sgemm).

    --image-size 36x36 times every model on images of that size: what training on your own data
    (`capsctl train --dataset PATH --image-size HxW`) will cost, or the MultiMNIST canvas.

    Several runs make a figure: save each `--json` output in one folder (speed/bench-1.json, …) and
    `capsctl experiment report speed --out SPEED.md` tables their medians with each run's figure.

    Example: capsctl bench --backends torch --heads capsule,pool --json
    """
    import json

    from capsctl.bench.measure import BenchConfig
    from capsctl.bench.report import run
    from capsctl.cli._options import check_range
    from capsctl.data.sources import parse_image_size

    batch_size = renamed("--batch-size", batch_size, "--batch", batch, 128)
    infer_batch_size = renamed("--infer-batch-size", infer_batch_size, "--infer-batch", infer_batch, 512)
    check_range("--batch-size", batch_size, 1, 4096)  # (BenchConfig checks the rest, by the same names)
    check_range("--infer-batch-size", infer_batch_size, 1, 65536)
    cfg = BenchConfig(
        backends=tuple(renamed("--backends", backends, "--backend", backend, _BACKENDS)),
        heads=_variants(
            renamed("--heads", heads, "--head", head, _HEADS), given(ctx, "heads", "head"), arch
        ),
        batch=batch_size,
        windows=windows,
        steps=steps,
        warmup=warmup,
        infer_batch=infer_batch_size,
        infer_batches=infer_batches,
        sgemm=sgemm,
        routing=routing,
        image_size=parse_image_size(image_size),
    )
    cfg.validate()
    from capsctl._console import err

    with err.status("measuring…") as status:
        report = run(
            cfg, on_backend=lambda name: status.update(f"measuring {name} (one process per backend)…")
        )
    if json_out:
        typer.echo(json.dumps(report))
    else:
        _print(report)
    # a measurement that failed (a backend's child died: out of memory, a timeout) is not a result
    failed = [name for name, r in report.get("backends", {}).items() if "error" in r]
    if failed:
        from capsctl._console import err

        err.print(f"error: the measurement failed on {', '.join(failed)}", highlight=False, soft_wrap=True)
        raise typer.Exit(1)


def _variants(heads: list[str], heads_given: bool, archs: list[str] | None) -> tuple[str, ...]:
    """--heads, and each --arch as the variant `arch:NAME` (seed: the capsule head); --arch alone
    measures the architectures only."""
    from capsctl.bench import ARCH_PREFIX

    if not archs:
        return tuple(heads)
    extra = ["capsule" if a == "seed" else f"{ARCH_PREFIX}{a}" for a in archs]
    base = heads if heads_given else []
    return tuple(dict.fromkeys([*base, *extra]))


def _fmt(value: Any, spec: str = ".0f", suffix: str = "") -> str:
    return "—" if value is None else f"{value:{spec}}{suffix}"


def _pct(value: float | None) -> str:
    return "—" if value is None else f"{100 * value:.0f}%"


def _met(value: bool | None) -> str:
    return "" if value is None else "[green]met[/]" if value else "[red]missed[/]"


def _print(report: dict[str, Any]) -> None:
    from rich.table import Table

    from capsctl._console import out
    from capsctl.bench.machine import cpu_text

    m, cfg = report["machine"], report["config"]
    load = m.get("loadavg_before")
    load_text = f", load average {load[0]:.1f}" if load else ""
    out.print(f"[bold]capsctl bench[/] — {cpu_text(m)}, {m['cores']} CPUs{load_text}")
    size = cfg.get("image_size")
    sizes = "{}×{}".format(*size) if size else "28×28 (--arch: its design size)"
    train = Table(title=f"training, batch {cfg['batch']}, {sizes}")
    columns = ("backend", "head", "params", "img/s", "step ms", "CPU ms", "GFLOP/s", "of sgemm", "per CPU-s")
    for col in columns:
        left = col in ("backend", "head")
        train.add_column(col, justify="left" if left else "right", no_wrap=col == "head")
    infer = Table(title=f"inference, batch {cfg['infer_batch']}, img/s")
    from capsctl.bench.measure import infer_sizes

    shown = infer_sizes(tuple(size) if size else None)
    for col in ("backend", "head", *(f"{h}×{w}" for h, w in shown)):
        infer.add_column(col, justify="left" if col in ("backend", "head") else "right")
    notes = []
    for name, r in report["backends"].items():
        if not r.get("available") or "error" in r:
            why = r.get("reason") or r.get("error") or "not available"
            train.add_row(name, "—", "n/a" if not r.get("available") else "failed")
            notes.append(f"{name}: {why}")
            continue
        for head, h in r["heads"].items():
            inf = h["infer_images_per_s"]  # (none for capsule+decoder, nor for capsule as its reference)
            train.add_row(
                name,
                head.removeprefix("arch:"),  # (an --arch variant is named by its architecture)
                _fmt(h.get("parameters"), ","),
                _fmt(h["train_images_per_s"]),
                _fmt(h["train_step_ms"]),
                _fmt(h["train_step_cpu_ms"]),
                _fmt(h["achieved_gflops"]),
                _pct(h["sgemm_fraction"]),
                _pct(h.get("sgemm_fraction_cpu")),
            )
            if inf:
                infer.add_row(name, head, *(_fmt(inf.get(f"{h}x{w}")) for h, w in shown))
        sg = r["sgemm"]
        line = [
            f"{name}: {r['describe']}",
            f"sgemm {_fmt(sg['gflops'])} GFLOP/s "
            f"(n={sg['n']}; {_fmt(sg.get('gflops_per_cpu_s'))} per CPU-second)",
        ]
        if "capsule_step_ratio" in r:
            line.append(
                f"capsule step = {r['capsule_step_ratio']:.3f} × pool step "
                f"({_fmt(r.get('capsule_step_ratio_cpu'), '.3f')} in CPU time): the head is "
                f"{r['capsule_head_share']:.1%} of the step, {r['capsule_head_flop_share']:.1%} of the FLOPs"
            )
        if "decoder_step_ratio" in r:
            trained = "" if r.get("decoder_trained") else " [red](the decoder's weights did not move!)[/]"
            line.append(
                f"{DECODER} step = {r['decoder_step_ratio']:.3f} × capsule step "
                f"({_fmt(r.get('decoder_step_ratio_cpu'), '.3f')} in CPU time; "
                f"{r['decoder_flop_ratio']:.3f} × the FLOPs){trained}"
            )
        line.append(
            f"peak RSS: training {_fmt(r['train_peak_rss_mb'])} MB, "
            f"inference {_fmt(r.get('infer_peak_rss_mb'))} MB"
        )
        if "routing" in r:
            rt = r["routing"]
            line.append(
                f"capsule head fwd+bwd, batch {rt['batch']}: naive loop {rt['naive_ms']:.1f} ms, "
                f"ours {rt['vectorised_ms']:.1f} ms ({rt['speedup']:.1f}× faster)"
            )
        notes.append("\n  ".join(line))
    out.print(train)
    if infer.row_count:  # (none when only capsule+decoder was asked for)
        out.print(infer)
    for note in notes:
        out.print(note)
    if report["checks"]:
        checks = Table(title="targets (wall clock; per CPU-second: load-robust)")
        for col in ("target", "backend", "limit", "wall", "", "CPU-s", ""):
            checks.add_column(col)
        for c in report["checks"]:
            checks.add_row(
                c["target"],
                c["backend"],
                f"{c['limit']:.4g}",
                f"{c['value']:.3g}",
                _met(c["met"]),
                _fmt(c.get("value_cpu"), ".3g"),
                _met(c.get("met_cpu")),
            )
        out.print(checks)
