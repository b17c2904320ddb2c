"""A description of this machine (CPU model, cores, load) for every figure capsctl records."""

from __future__ import annotations

import math
import os
import platform
from pathlib import Path
from typing import Any


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def cpu_detail(cpuinfo: str | None = None) -> str | None:
    """'family 25 model 17, AVX-512' from /proc/cpuinfo's first processor: the model name alone ("AMD
    EPYC") covers CPUs a generation apart, whose speeds differ by 2× on the same code. None elsewhere."""
    if cpuinfo is None:
        try:
            cpuinfo = Path("/proc/cpuinfo").read_text()
        except OSError:
            return None
    first = cpuinfo.split("\n\n", 1)[0]
    fields = {k.strip(): v.strip() for k, _, v in (line.partition(":") for line in first.splitlines())}
    if "cpu family" not in fields or "model" not in fields:
        return None
    flags = set(fields.get("flags", "").split())
    widest = "AVX-512" if "avx512f" in flags else "AVX2" if "avx2" in flags else None
    detail = f"family {fields['cpu family']} model {fields['model']}"
    return f"{detail}, {widest}" if widest else detail


def cpu_text(m: dict[str, Any]) -> str:
    """A recorded machine's CPU as a report names it: 'AMD EPYC, family 25 model 17, AVX-512'."""
    detail = m.get("cpu_detail")
    return f"{m.get('cpu', '?')}, {detail}" if detail else str(m.get("cpu", "?"))


def machine_text(m: dict[str, Any]) -> str:
    """A recorded machine as reports name it: '2 cores (AMD EPYC, family 25 model 17, AVX-512)'."""
    return f"{m.get('cores', '?')} cores ({cpu_text(m)})"


def machine() -> dict[str, Any]:
    load = os.getloadavg() if hasattr(os, "getloadavg") else (math.nan,) * 3
    detail = cpu_detail()
    return {
        "cpu": cpu_name(),
        **({"cpu_detail": detail} if detail else {}),
        "cores": os.cpu_count(),
        "python": platform.python_version(),
        "loadavg": [round(x, 2) for x in load],
    }
