"""Helpers shared by the test files, each defined once here.

- running the CLI in-process (`run_cli`) and the contract for a refused command (`assert_one_line_error`);
- a tiny model spec (`TINY`) and tiny IDX data sets (`idx_bytes`, `gz`, `write_set`), and a static file
  server on 127.0.0.1 to download them from (`static_server`);
- taking a safetensors file apart to damage it (`split_safetensors`, `join_safetensors`, `rewrite_header`);
- hand-made PNG files (`png_chunk`, `png_bytes`, `huge_png`);
- inputs for the backend tests: real digits and weights that make routing non-trivial;
- `snapshot`, a copy of a trainer's weights or optimiser state that later steps cannot change.
"""

from __future__ import annotations

import ast
import gzip
import http.server
import json
import struct
import threading
import zlib
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest

# -- the command line -------------------------------------------------------------------------------


def run_cli(args: list, capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    """Run capsctl in-process; returns (exit code, stdout, stderr)."""
    from capsctl.cli import main

    with pytest.raises(SystemExit) as info:
        main([str(a) for a in args])
    captured = capsys.readouterr()
    code = info.value.code
    return (code if isinstance(code, int) else 1), captured.out, captured.err


def assert_one_line_error(code: int, out: str | None, err: str, *fragments: str) -> None:
    """A refused command: exit code 2, nothing on stdout, exactly one line `error: ...` on stderr
    holding every fragment, and no traceback. Pass out=None where stdout was not captured."""
    assert code == 2, (code, err)
    if out is not None:
        assert out == "", out
    assert err.startswith("error: "), err
    assert err.count("\n") == 1 and err.endswith("\n"), err
    assert "Traceback" not in err, err
    for fragment in fragments:
        assert fragment in err, (fragment, err)


# -- a tiny model and tiny data sets ---------------------------------------------------------------------

TINY = {
    "trunk": [{"type": "conv", "filters": 4, "kernel": 3}, {"type": "avgpool", "size": 2},
              {"type": "conv", "filters": 4, "kernel": 3}],
    "head": "capsule",
    "capsule": {"dim": 4, "routings": 2},
}

# IDX type codes -> big-endian numpy dtypes
IDX_DTYPES = {0x08: ">u1", 0x09: ">i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


def idx_bytes(arr: np.ndarray, code: int = 0x08) -> bytes:
    """An IDX file: magic, dimensions, then `arr` stored as type `code` (unsigned bytes by default)."""
    arr = np.asarray(arr)
    head = struct.pack(">HBB", 0, code, arr.ndim) + struct.pack(f">{arr.ndim}I", *arr.shape)
    return head + arr.astype(IDX_DTYPES[code]).tobytes()


def gz(raw: bytes) -> bytes:
    """gzip with a fixed timestamp, so the same input always gives the same bytes."""
    return gzip.compress(raw, mtime=0)


def write_set(folder: Path, arrays: Mapping[str, np.ndarray], compress: bool = True) -> dict[str, bytes]:
    """An MNIST-style folder of four IDX files from `arrays` (keyed train-images, train-labels,
    t10k-images, t10k-labels); returns the bytes written per role."""
    from capsctl.data.datasets import FILES as IDX_NAMES

    folder.mkdir(parents=True, exist_ok=True)
    written = {}
    for role, name in IDX_NAMES.items():
        raw = idx_bytes(arrays[role])
        written[role] = gz(raw) if compress else raw
        (folder / (name + (".gz" if compress else ""))).write_bytes(written[role])
    return written


@contextmanager
def static_server(root: Path) -> Iterator[str]:
    """Serve the files under `root` on 127.0.0.1 (an ephemeral port); yields the base URL (no trailing /)."""

    class Quiet(http.server.SimpleHTTPRequestHandler):
        def __init__(self, *a, **k) -> None:
            super().__init__(*a, directory=str(root), **k)

        def log_message(self, *a) -> None:
            pass

    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Quiet)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{httpd.server_address[1]}"
    finally:
        httpd.shutdown()
        httpd.server_close()


def split_safetensors(data: bytes) -> tuple[dict, bytes]:
    """A safetensors file's JSON header and the bytes after it."""
    (n,) = struct.unpack("<Q", data[:8])
    return json.loads(data[8 : 8 + n]), data[8 + n :]


def join_safetensors(header: dict | str, body: bytes) -> bytes:
    """A safetensors file from a header (a dict, or JSON text as it is, e.g. with a key twice) and a body."""
    head = (header if isinstance(header, str) else json.dumps(header)).encode()
    return struct.pack("<Q", len(head)) + head + body


def rewrite_header(data: bytes, edit) -> bytes:
    """The safetensors file `data` with its header changed in place by `edit(header)`."""
    header, body = split_safetensors(data)
    edit(header)
    return join_safetensors(header, body)


def png_chunk(kind: bytes, data: bytes) -> bytes:
    crc = zlib.crc32(kind + data) & 0xFFFFFFFF
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", crc)


def png_bytes(ihdr: bytes, idat: bytes) -> bytes:
    """A PNG file: signature, IHDR, one IDAT, IEND."""
    chunks = png_chunk(b"IHDR", ihdr) + png_chunk(b"IDAT", idat) + png_chunk(b"IEND", b"")
    return b"\x89PNG\r\n\x1a\n" + chunks


def huge_png(path: Path, side: int = 20000) -> None:
    """A valid all-black 1-bit PNG of side×side pixels (a few kB on disk, 400 Mpixel decoded)."""
    row = b"\x00" * (1 + (side + 7) // 8)
    comp = zlib.compressobj(9)
    body = b"".join(comp.compress(row * 1000) for _ in range(side // 1000)) + comp.flush()
    path.write_bytes(png_bytes(struct.pack(">IIBBBBB", side, side, 1, 0, 0, 0, 0), body))


def dotted_name(node: ast.AST) -> str:
    """`a.b.c` for the expression a.b.c (the callee of an ast.Call), '?' for anything else."""
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        return f"{dotted_name(node.value)}.{node.attr}"
    return "?"


# -- the backend tests ------------------------------------------------------------------------------------

# Every backend, each carrying its marker, so `-m "not keras"` deselects exactly the Keras runs
# (the `backend` fixture in conftest.py takes these params).
BACKENDS = [pytest.param("torch", marks=pytest.mark.torch), pytest.param("keras", marks=pytest.mark.keras)]

VARIANTS = [(r, s) for r in ("su", "sabour", "su-unit") for s in ("su", "sabour")]


def real_digits(mnist, n: int = 4, height: int = 28) -> np.ndarray:
    """n real test digits, or (height 56) n vertical pairs of them."""
    x = mnist.test().images[:n]
    return np.concatenate([x, mnist.test().images[n : 2 * n]], axis=1) if height == 56 else x


def on_canvas(images: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """(N, h, w, C) images centred on a zero (N, H, W, C) canvas: digits at a preset's design size."""
    dh, dw = size[0] - images.shape[1], size[1] - images.shape[2]
    return np.pad(images, ((0, 0), (dh // 2, dh - dh // 2), (dw // 2, dw - dw // 2), (0, 0)))


def routing_weights(spec, seed: int = 1) -> dict[str, np.ndarray]:
    """Glorot weights with positive biases: non-trivial routing on real digits.

    Batch normalisation gets statistics as after training, each from its own range: at their starting
    values (scale 1, shift 0, mean 0, variance 1) a backend whose name table swapped shift with mean, or
    scale with variance, agreed with the reference."""
    from capsctl.model.weights import init_weights

    w = init_weights(spec, seed)
    rng = np.random.default_rng(seed)
    ranges = {".bias": (0, 0.05), ".bn.beta": (0, 0.1), ".bn.mean": (-0.2, 0.0)}
    ranges |= {".bn.gamma": (0.7, 1.0), ".bn.var": (1.2, 2.0)}
    for k, v in w.items():
        for end, (lo, hi) in ranges.items():
            if k.endswith(end):
                w[k] = rng.uniform(lo, hi, v.shape).astype(np.float32)
    return w


def reference_loss_with_decoder(spec, w, x, y_onehot, recon_weight):
    """The loss written out in numpy: margin loss + weight × Σ_pixels (recon − x)², mean over the batch."""
    from capsctl.model import reference

    v = reference.capsules(spec, w, x)
    p = np.sqrt((v * v).sum(-1) + 1e-7)
    margin = y_onehot * np.maximum(0.9 - p, 0) ** 2 + 0.25 * (1 - y_onehot) * np.maximum(p - 0.1, 0) ** 2
    recon = reference.decode(spec, w, v * y_onehot[..., None])
    sq = ((recon - x) ** 2).reshape(len(x), -1).sum(1)
    return margin.mean(1).mean() + recon_weight * sq.mean()


def snapshot(arrays: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Copies of a trainer's weights() or optimizer_state(): the torch trainer returns arrays that
    share memory with its live tensors, which its next step changes in place."""
    return {k: np.array(v, copy=True) for k, v in arrays.items()}


def rel_diff(a: np.ndarray, b: np.ndarray) -> float:
    """|a - b| / |b| (Frobenius norms, in float64): a difference measured against the size of b."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


# -- interrupted runs -----------------------------------------------------------------------------------

TIMING = ("images_per_s", "seconds")  # the only metrics fields allowed to differ between runs


def stop_after_first_epoch(monkeypatch: pytest.MonkeyPatch) -> None:
    """Ctrl-C right after epoch 1 is saved, the way a user stops a run."""
    import signal

    from capsctl.training import loop

    real = loop.train

    def interrupted(*args, **kwargs):
        def hook(kind: str, info: dict) -> None:
            if kind == "epoch" and info["epoch"] == 1:
                signal.raise_signal(signal.SIGINT)

        return real(*args, on_step=hook, **kwargs)

    monkeypatch.setattr(loop, "train", interrupted)


def metrics_rows(run: Path) -> list[dict]:
    """A run's metrics.jsonl rows without the timing fields."""
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if k not in TIMING} for r in rows]
