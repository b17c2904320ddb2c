"""`capsctl bench`: one child process per backend (capsctl.bench.measure), the targets checked against
what they measured, and the JSON-ready report."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict
from typing import Any

from capsctl.backend import get_backend
from capsctl.bench.machine import machine
from capsctl.bench.measure import BenchConfig, variant_size, variant_spec
from capsctl.errors import CapsctlError
from capsctl.model import flops

# the speed and memory targets (docs/PERFORMANCE.md); reported as met / missed, never asserted
TARGET_CAPSULE_RATIO = 1.10


TARGET_SGEMM_FRACTION = 0.90


TARGET_BACKEND_RATIO = 1.15


TARGET_DECODER_RATIO = 1.15  # training step with the decoder (28×28) / without


TARGET_TRAIN_RSS_MB = 1536.0


# OpenMP's wait policy as the user set it, before any backend package was imported here
# (capsctl_torch sets it for itself): each child gets what it would get when run on its own.
_USER_OMP = os.environ.get("OMP_WAIT_POLICY")


def availability(name: str) -> str | None:
    """None if backend `name` can run here, else why not (without importing its framework)."""

    try:
        get_backend(name)
    except CapsctlError as e:
        return str(e)
    return None


def run_child(name: str, cfg: BenchConfig, timeout: float | None = None) -> dict[str, Any]:
    """Measure backend `name` in a fresh interpreter; returns its result dict (or an error entry)."""
    with tempfile.TemporaryDirectory(prefix="capsctl-bench-") as tmp:
        out = os.path.join(tmp, "result.json")
        cmd = [sys.executable, "-m", "capsctl.bench.measure", name, json.dumps(asdict(cfg)), out]
        try:
            env = dict(os.environ)
            env.pop("OMP_WAIT_POLICY", None)
            if _USER_OMP is not None:
                env["OMP_WAIT_POLICY"] = _USER_OMP
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, check=False, env=env)
        except subprocess.TimeoutExpired:
            return {"backend": name, "available": True, "error": f"timed out after {timeout:.0f} s"}
        if proc.returncode != 0 or not os.path.exists(out):
            lines = [x for x in proc.stderr.strip().splitlines() if x.strip()]
            return {
                "backend": name,
                "available": True,
                "error": lines[-1] if lines else f"exit code {proc.returncode}",
            }
        with open(out) as fh:
            result: dict[str, Any] = json.load(fh)
        return result


def checks(results: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    """The speed and memory targets, each with its measured value (wall clock, as the targets are defined)
    and, where it applies, the same ratio per CPU-second (`value_cpu`, load-robust)."""
    rows: list[dict[str, Any]] = []

    def add(
        target: str,
        backend: str,
        value: float | None,
        limit: float,
        below: bool = True,
        value_cpu: float | None = None,
    ) -> None:
        if value is None:
            return

        def met(v: float | None) -> bool | None:
            return None if v is None or v != v else bool(v <= limit if below else v >= limit)

        rows.append(
            {
                "target": target,
                "backend": backend,
                "value": value,
                "limit": limit,
                "met": met(value),
                "value_cpu": value_cpu,
                "met_cpu": met(value_cpu),
            }
        )

    ok = {k: r for k, r in results.items() if r.get("available") and "error" not in r}
    for name, r in ok.items():
        add(
            "capsule step / pool step",
            name,
            r.get("capsule_step_ratio"),
            TARGET_CAPSULE_RATIO,
            value_cpu=r.get("capsule_step_ratio_cpu"),
        )
        caps = r.get("heads", {}).get("capsule", {})
        add(
            "train FLOP rate / sgemm",
            name,
            caps.get("sgemm_fraction"),
            TARGET_SGEMM_FRACTION,
            below=False,
            value_cpu=caps.get("sgemm_fraction_cpu"),
        )
        add(
            "capsule+decoder step / capsule step",
            name,
            r.get("decoder_step_ratio"),
            TARGET_DECODER_RATIO,
            value_cpu=r.get("decoder_step_ratio_cpu"),
        )
        if r.get("decoder_step_ratio") is not None and r.get("decoder_trained") is False:
            rows[-1] |= {"met": False, "met_cpu": False}  # the decoder's loss never reached it: not valid
        add("train peak RSS MB", name, r.get("train_peak_rss_mb"), TARGET_TRAIN_RSS_MB)
    if len(ok) >= 2:
        heads = set.intersection(*(set(r.get("heads", {})) for r in ok.values()))
        for head in sorted(heads):
            hs = [r["heads"][head] for r in ok.values()]
            ips = [h["train_images_per_s"] for h in hs]
            cpu = [h["train_step_cpu_ms"] for h in hs]
            add(
                f"train img/s, fast/slow ({head})",
                ",".join(ok),
                max(ips) / min(ips),
                TARGET_BACKEND_RATIO,
                value_cpu=max(cpu) / min(cpu) if min(cpu) > 0 else None,
            )
    return rows


def run(cfg: BenchConfig, on_backend: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Run the benchmark for every backend in `cfg`; returns the JSON-ready report."""
    cfg.validate()
    started = time.time()
    load_before = os.getloadavg() if hasattr(os, "getloadavg") else None
    results: dict[str, dict[str, Any]] = {}
    for name in cfg.backends:
        why = availability(name)
        if why is not None:
            results[name] = {"backend": name, "available": False, "reason": why}
            continue
        if on_backend is not None:
            on_backend(name)
        results[name] = run_child(name, cfg)
    load_after = os.getloadavg() if hasattr(os, "getloadavg") else None

    size = cfg.image_size
    counts = {h: flops.count(variant_spec(h, size), *variant_size(h, size)) for h in cfg.trained()}
    return {
        "machine": machine() | {"loadavg_before": load_before, "loadavg_after": load_after},
        # (when it ran: a folder of runs, reported by `experiment report`, says when each was taken)
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(started)),
        "config": asdict(cfg),
        "flops_per_image": {
            h: asdict(c) | {"forward": c.forward, "train_step": c.train_step} for h, c in counts.items()
        },
        "backends": results,
        "checks": checks(results),
    }
