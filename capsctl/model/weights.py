"""The canonical weight file: one `.safetensors` holding a model and its spec.

Contract (shared by every backend and by other people's tools):
- float32 tensors in channels-last layout;
- metadata {"format": "capsctl/1", "spec": "<ModelSpec JSON>"};
- names `trunk.{k}.kernel` [kh, kw, in, out], `trunk.{k}.bias` [out] for the k-th conv,
  `head.capsule.kernel` [C, J*D] (shared) or [N, C, J*D], `head.dense0.kernel` [C, hidden],
  `head.dense0.bias` [hidden], `head.dense1.kernel` [hidden, J], `head.dense1.bias` [J].

The reader is our own strict parser (not the safetensors loader) so that every kind of broken
file is refused with a message naming the problem, before any framework is imported.
"""

from __future__ import annotations

import itertools
import json
import math
import os
import struct
from collections.abc import Mapping
from pathlib import Path

import numpy as np

from capsctl._io import atomic_write_bytes, read_user_file
from capsctl.errors import CapsctlError
from capsctl.model.spec import ModelSpec

MODEL_FORMAT = "capsctl/1"
CHECKPOINT_FORMAT = "capsctl-checkpoint/1"
_MAX_HEADER = 100 * 1024 * 1024  # a header longer than this is not a capsctl file
_DTYPES: dict[str, np.dtype] = {"F32": np.dtype("<f4"), "F64": np.dtype("<f8"), "I64": np.dtype("<i8"), "U8": np.dtype("u1")}
_DTYPE_NAMES = {v: k for k, v in _DTYPES.items()}

Weights = dict[str, np.ndarray]


def expected_shapes(spec: ModelSpec) -> dict[str, tuple[int, ...]]:
    """Every tensor name the spec implies, with its canonical shape, in a fixed order."""
    shapes: dict[str, tuple[int, ...]] = {}
    channels = spec.in_channels
    for k, conv in enumerate(spec.conv_layers):
        shapes[f"trunk.{k}.kernel"] = (conv.kernel, conv.kernel, channels, conv.filters)
        shapes[f"trunk.{k}.bias"] = (conv.filters,)
        channels = conv.filters
    j = spec.num_classes
    if spec.head == "capsule":
        caps = spec.capsule
        width = j * caps.dim
        if caps.shared:
            shapes["head.capsule.kernel"] = (channels, width)
        else:
            assert caps.num_inputs is not None
            shapes["head.capsule.kernel"] = (caps.num_inputs, channels, width)
    else:
        hidden = spec.pool.hidden
        shapes["head.dense0.kernel"] = (channels, hidden)
        shapes["head.dense0.bias"] = (hidden,)
        shapes["head.dense1.kernel"] = (hidden, j)
        shapes["head.dense1.bias"] = (j,)
    return shapes


def parameter_count(spec: ModelSpec) -> int:
    return sum(math.prod(s) for s in expected_shapes(spec).values())


def init_weights(spec: ModelSpec, seed: int) -> Weights:
    """Glorot-uniform kernels and zero biases, drawn in numpy so every backend starts identical.

    Fans follow Keras' rule: the last two axes are (in, out), earlier axes multiply both.
    """
    rng = np.random.default_rng(seed)
    out: Weights = {}
    for name, shape in expected_shapes(spec).items():
        if name.endswith(".bias"):
            out[name] = np.zeros(shape, np.float32)
            continue
        receptive = math.prod(shape[:-2]) if len(shape) > 2 else 1
        fan_in, fan_out = shape[-2] * receptive, shape[-1] * receptive
        limit = math.sqrt(6.0 / (fan_in + fan_out))
        out[name] = rng.uniform(-limit, limit, size=shape).astype(np.float32)
    return out


def check_weights(spec: ModelSpec, weights: Mapping[str, np.ndarray], source: str) -> None:
    """Names, shapes, dtype and finiteness against the spec; names the first mismatch."""
    shapes = expected_shapes(spec)
    for name, shape in shapes.items():
        if name not in weights:
            raise CapsctlError(f"{source}: tensor {name!r} is missing (the spec needs it)")
        arr = weights[name]
        if tuple(arr.shape) != shape:
            raise CapsctlError(f"{source}: tensor {name!r} has shape {list(arr.shape)}, the spec needs {list(shape)}")
        if arr.dtype != np.float32:
            raise CapsctlError(f"{source}: tensor {name!r} is {arr.dtype}, expected float32")
        if not np.isfinite(arr).all():
            raise CapsctlError(f"{source}: tensor {name!r} holds NaN or infinite values")
    extra = sorted(set(weights) - set(shapes))
    if extra:
        raise CapsctlError(f"{source}: tensor {extra[0]!r} is not part of this model's spec")


# -- the safetensors container -----------------------------------------------------------

def encode_safetensors(tensors: Mapping[str, np.ndarray], metadata: Mapping[str, str]) -> bytes:
    """Serialise to the safetensors layout (8-byte header length, JSON header, raw data)."""
    header: dict[str, object] = {"__metadata__": dict(metadata)}
    blobs = []
    offset = 0
    for name in sorted(tensors):
        arr = np.ascontiguousarray(tensors[name])
        dtype = arr.dtype.newbyteorder("<") if arr.dtype.byteorder == ">" else arr.dtype
        if dtype not in _DTYPE_NAMES:
            raise CapsctlError(f"tensor {name!r}: dtype {arr.dtype} cannot be stored")
        data = arr.astype(dtype, copy=False).tobytes()
        header[name] = {"dtype": _DTYPE_NAMES[dtype], "shape": list(arr.shape), "data_offsets": [offset, offset + len(data)]}
        blobs.append(data)
        offset += len(data)
    head = json.dumps(header, separators=(",", ":")).encode()
    head += b" " * (-len(head) % 8)  # the format aligns the data to 8 bytes
    return struct.pack("<Q", len(head)) + head + b"".join(blobs)


def decode_safetensors(data: bytes, source: str) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    """Parse and validate a safetensors byte string; CapsctlError on any defect."""
    if len(data) < 8:
        raise CapsctlError(f"{source}: not a safetensors file (only {len(data)} bytes)")
    (n,) = struct.unpack("<Q", data[:8])
    if n > _MAX_HEADER or 8 + n > len(data):
        raise CapsctlError(f"{source}: header length {n} runs past the end of the file ({len(data)} bytes); truncated?")
    try:
        header = json.loads(data[8 : 8 + n].decode("utf-8"), object_pairs_hook=_no_duplicates)
    except _DuplicateKey as e:
        raise CapsctlError(f"{source}: the safetensors header names {e.args[0]!r} twice") from None
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError):
        raise CapsctlError(f"{source}: the safetensors header is not valid JSON") from None
    if not isinstance(header, dict):
        raise CapsctlError(f"{source}: the safetensors header is not a JSON object")
    meta = header.pop("__metadata__", {}) or {}
    if not isinstance(meta, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in meta.items()):
        raise CapsctlError(f"{source}: __metadata__ must map strings to strings")
    body = memoryview(data)[8 + n :]
    spans = []
    tensors: dict[str, np.ndarray] = {}
    for name, info in header.items():
        if not isinstance(info, dict):
            raise CapsctlError(f"{source}: entry {name!r} is not an object")
        dtype_name, shape, offsets = info.get("dtype"), info.get("shape"), info.get("data_offsets")
        if not isinstance(dtype_name, str) or dtype_name not in _DTYPES:  # (a list or dict is unhashable)
            raise CapsctlError(f"{source}: tensor {name!r} has unsupported dtype {dtype_name!r}")
        if (
            not isinstance(shape, list)
            or len(shape) > 8
            or not all(isinstance(s, int) and not isinstance(s, bool) and 0 <= s < 1 << 40 for s in shape)
        ):
            raise CapsctlError(f"{source}: tensor {name!r} has an invalid shape {shape!r}")
        if (
            not isinstance(offsets, list)
            or len(offsets) != 2
            or not all(isinstance(o, int) and not isinstance(o, bool) for o in offsets)
        ):
            raise CapsctlError(f"{source}: tensor {name!r} has invalid data_offsets {offsets!r}")
        start, stop = offsets
        dtype = _DTYPES[dtype_name]
        if start < 0 or stop < start:
            raise CapsctlError(f"{source}: tensor {name!r} has negative or reversed offsets {offsets}")
        if stop > len(body):
            raise CapsctlError(f"{source}: tensor {name!r} ends at byte {stop}, past the data ({len(body)} bytes); truncated?")
        if stop - start != math.prod(shape) * dtype.itemsize:
            raise CapsctlError(f"{source}: tensor {name!r}: {stop - start} bytes do not fit shape {shape} of {dtype_name}")
        spans.append((start, stop, name))
        tensors[name] = np.frombuffer(body[start:stop], dtype=dtype).reshape(shape).copy()
    spans.sort()
    pairs = list(itertools.pairwise(spans))
    for (_, stop_a, a), (start_b, _, b) in pairs:
        if start_b < stop_a:
            raise CapsctlError(f"{source}: tensors {a!r} and {b!r} overlap")
    # The format requires the data to be covered exactly, without holes: a gap or a tail of stray
    # bytes means a damaged or spliced file, not one any writer produced.
    for (_, stop_a, a), (start_b, _, _) in pairs:
        if start_b > stop_a:
            raise CapsctlError(f"{source}: {start_b - stop_a} stray bytes after tensor {a!r} (damaged file?)")
    end = spans[-1][1] if spans else 0
    if (spans and spans[0][0] != 0) or end != len(body):
        raise CapsctlError(f"{source}: the data section holds bytes no tensor uses (damaged or spliced file?)")
    return tensors, meta


class _DuplicateKey(Exception):
    pass


def _no_duplicates(pairs: list[tuple[str, object]]) -> dict[str, object]:
    # json.loads would keep the last of two equal keys silently; a header naming a tensor twice is damaged.
    out: dict[str, object] = {}
    for key, value in pairs:
        if key in out:
            raise _DuplicateKey(key)
        out[key] = value
    return out


def read_safetensors(path: str | os.PathLike[str]) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    return decode_safetensors(read_user_file(path, "a .safetensors file"), str(Path(path)))


def spec_from_metadata(meta: Mapping[str, str], source: str, expected_format: str) -> ModelSpec:
    fmt = meta.get("format")
    if fmt != expected_format:
        raise CapsctlError(f"{source}: format is {fmt!r}, expected {expected_format!r}")
    if "spec" not in meta:
        raise CapsctlError(f"{source}: metadata has no model spec")
    try:
        return ModelSpec.from_json(meta["spec"])
    except CapsctlError as e:
        raise CapsctlError(f"{source}: {e}") from None


# -- model files -------------------------------------------------------------------------

def save_model(path: str | os.PathLike[str], spec: ModelSpec, weights: Mapping[str, np.ndarray]) -> None:
    check_weights(spec, weights, str(path))
    atomic_write_bytes(path, encode_safetensors(weights, {"format": MODEL_FORMAT, "spec": spec.to_json()}))


def load_model(path: str | os.PathLike[str]) -> tuple[ModelSpec, Weights]:
    """Read and fully validate a model file; no framework is touched."""
    tensors, meta = read_safetensors(path)
    spec = spec_from_metadata(meta, str(path), MODEL_FORMAT)
    check_weights(spec, tensors, str(path))
    return spec, tensors
