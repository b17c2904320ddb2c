"""The canonical weight file: one `.safetensors` holding a model and its spec.

Contract (shared by every backend and by other people's tools):
- float32 tensors in channels-last layout;
- metadata {"format": "capsctl/1", "spec": "<ModelSpec JSON>"}, optionally more entries (the shipped
  model's "provenance": JSON naming the command, seed, commit and the numbers it reached; a trained
  model's "training_data": JSON [images, CRC-32 of their labels] of the training part it drew from);
- names `trunk.{k}.kernel` [kh, kw, in, out], `trunk.{k}.bias` [out] for the k-th conv,
  with batch normalisation `trunk.{k}.bn.gamma`, `.beta`, `.mean`, `.var` [out] (the last two running
  statistics); with primary capsules `head.primary.kernel` [k, k, C_trunk, TYPES*DIM] ('depthwise':
  [k, k, C_trunk, 1]) and `head.primary.bias` [TYPES*DIM] (then C = DIM below);
  `head.capsule.kernel` [C, J*D] (shared) or [N, C, J*D]; with 'attention' routing `head.capsule.bias` [N, J];
  `head.dense0.kernel` [C, hidden], `head.dense0.bias` [hidden], `head.dense1.kernel` [hidden, J],
  `head.dense1.bias` [J];
  with a decoder, `decoder.dense{k}.kernel` [in, out] and `decoder.dense{k}.bias` [out], k = 0..len(hidden).

The container is read and written by the safetensors library; a damaged file is refused with one
line naming it and the library's reason, before any framework is imported. On top of the container,
capsctl checks what the format promises: the spec's names and shapes, float32, finite values, metadata.
"""

from __future__ import annotations

import json
import math
import os
import struct
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import safetensors
import safetensors.numpy

from capsctl._io import atomic_write_bytes, read_user_file
from capsctl.errors import CapsctlError
from capsctl.model.spec import ModelSpec

MODEL_FORMAT = "capsctl/1"
# a trained model's metadata entry: JSON [images, CRC-32 of their labels] of the training part its run drew
# from (after --holdout/--val-fraction): `eval --holdout` finds the same part again, or refuses
TRAINING_DATA_KEY = "training_data"
CHECKPOINT_FORMAT = "capsctl-checkpoint/1"
# the dtypes capsctl stores: float32 weights and optimiser slots, a float64 step (safetensors names)
_DTYPES: dict[str, np.dtype] = {
    "F32": np.dtype("<f4"), "F64": np.dtype("<f8"), "I64": np.dtype("<i8"), "U8": np.dtype("u1"),
}

Weights = dict[str, np.ndarray]


def expected_shapes(spec: ModelSpec) -> dict[str, tuple[int, ...]]:
    """Every tensor name the spec implies, with its canonical shape, in a fixed order."""
    shapes: dict[str, tuple[int, ...]] = {}
    channels = spec.in_channels
    for k, conv in enumerate(spec.conv_layers):
        shapes[f"trunk.{k}.kernel"] = (conv.kernel, conv.kernel, channels, conv.filters)
        shapes[f"trunk.{k}.bias"] = (conv.filters,)
        if conv.batchnorm:
            for stat in BN_TENSORS:
                shapes[f"trunk.{k}.bn.{stat}"] = (conv.filters,)
        channels = conv.filters
    j = spec.num_classes
    if spec.head == "capsule":
        caps = spec.capsule
        width = j * caps.dim
        if caps.primary is not None:
            p = caps.primary
            out = 1 if p.kind == "depthwise" else p.types * p.dim  # depthwise: one filter per channel
            shapes["head.primary.kernel"] = (p.kernel, p.kernel, channels, out)
            shapes["head.primary.bias"] = (p.types * p.dim,)
            channels = p.dim
        if caps.shared:
            shapes["head.capsule.kernel"] = (channels, width)
        else:
            if caps.num_inputs is None:
                raise CapsctlError(
                    "model spec: capsule.num_inputs is not set (needed when capsule.shared is false; "
                    "`capsctl train` sets it from the training images)"
                )
            shapes["head.capsule.kernel"] = (caps.num_inputs, channels, width)
            if caps.routing == "attention":  # its log prior b_ij, one per input-output pair
                shapes["head.capsule.bias"] = (caps.num_inputs, j)
    else:
        hidden = spec.pool.hidden
        shapes["head.dense0.kernel"] = (channels, hidden)
        shapes["head.dense0.bias"] = (hidden,)
        shapes["head.dense1.kernel"] = (hidden, j)
        shapes["head.dense1.bias"] = (j,)
    for name, shape in decoder_shapes(spec).items():
        shapes[name] = shape
    return shapes


def decoder_shapes(spec: ModelSpec) -> dict[str, tuple[int, ...]]:
    """`decoder.dense{k}.kernel` [in, out] and `.bias` [out], k = 0..len(hidden): J·D -> ... -> H·W·C."""
    dec = spec.decoder
    if dec is None:
        return {}
    if dec.image_shape is None:
        raise CapsctlError("model spec: decoder.image_shape is not set (the training image size [H, W, C])")
    widths = [spec.num_classes * spec.capsule.dim, *dec.hidden, math.prod(dec.image_shape)]
    shapes: dict[str, tuple[int, ...]] = {}
    for k in range(len(widths) - 1):
        shapes[f"decoder.dense{k}.kernel"] = (widths[k], widths[k + 1])
        shapes[f"decoder.dense{k}.bias"] = (widths[k + 1],)
    return shapes


# a batch-normalised conv's tensors: scale γ, shift β (trained) and running mean μ and variance σ²
BN_TENSORS = ("gamma", "beta", "mean", "var")
RUNNING_STATS = (".bn.mean", ".bn.var")  # tensors that are updated from the data, not by the optimiser


def trained(name: str) -> bool:
    """Whether the optimiser trains tensor `name` (running statistics are saved, not trained)."""
    return not name.endswith(RUNNING_STATS)


def parameter_count(spec: ModelSpec) -> int:
    """Trained parameters (the papers' count): every tensor but the batch norms' running statistics."""
    return sum(math.prod(s) for name, s in expected_shapes(spec).items() if trained(name))


# 8 GiB of float32 weights (the optimiser's two moments triple it): the spec's fields are each bounded, but
# their product was not, and a spec of 42 billion parameters failed as "out of memory (try a smaller
# --batch-size)", exit 1, advice that had nothing to do with it
MAX_PARAMETERS = 1 << 31


def check_size(spec: ModelSpec) -> None:
    """Refuse a spec whose weights alone would not fit any machine, before anything is allocated."""
    n = parameter_count(spec)
    if n > MAX_PARAMETERS:
        raise CapsctlError(
            f"model spec: {n:,} trained parameters ({n * 4 / 2**30:,.0f} GiB of float32), over the limit of "
            f"{MAX_PARAMETERS:,}; make the layers narrower"
        )


def init_weights(spec: ModelSpec, seed: int) -> Weights:
    """Glorot-uniform kernels and zero biases, drawn in numpy so every backend starts identical.

    Fans follow Keras' rule: the last two axes are (in, out), earlier axes multiply both; except per-input
    capsule weights, whose fans are those of one C -> D map.
    """
    check_size(spec)
    rng = np.random.default_rng(seed)
    out: Weights = {}
    for name, shape in expected_shapes(spec).items():
        if name.endswith((".bias", ".bn.beta", ".bn.mean")):
            out[name] = np.zeros(shape, np.float32)
            continue
        if name.endswith((".bn.gamma", ".bn.var")):
            out[name] = np.ones(shape, np.float32)
            continue
        receptive = math.prod(shape[:-2]) if len(shape) > 2 else 1
        fan_in, fan_out = shape[-2] * receptive, shape[-1] * receptive
        if name == "head.capsule.kernel" and len(shape) == 3:
            # per-input weights [N, C, J·D] are N·J separate C -> D maps (û_j|i = u_i W_ij): their fans are
            # (C, D). Keras' rule would multiply both by N (1,152 for sabour2017), which leaves the capsules
            # so short that their lengths are all sqrt(EPS) and no gradient reaches past Adam's epsilon.
            fan_in, fan_out = shape[1], spec.capsule.dim
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
            raise CapsctlError(
                f"{source}: tensor {name!r} has shape {list(arr.shape)}, the spec needs {list(shape)}"
            )
        if arr.dtype != np.float32:
            raise CapsctlError(f"{source}: tensor {name!r} is {arr.dtype}, expected float32")
        if not np.isfinite(arr).all():
            raise CapsctlError(f"{source}: tensor {name!r} holds NaN or infinite values")
    extra = sorted(set(weights) - set(shapes))
    if extra:
        raise CapsctlError(f"{source}: tensor {extra[0]!r} is not part of this model's spec")


# -- the safetensors container -----------------------------------------------------------

def encode_safetensors(tensors: Mapping[str, np.ndarray], metadata: Mapping[str, str]) -> bytes:
    """The safetensors bytes of `tensors` with string `metadata`, written by the safetensors library."""
    arrays = {}
    for name, tensor in tensors.items():
        # the library reads raw memory: a non-contiguous view would be stored scrambled, without error
        arr = np.ascontiguousarray(tensor)
        if arr.dtype.newbyteorder("<") not in _DTYPES.values():
            raise CapsctlError(f"tensor {name!r}: dtype {arr.dtype} cannot be stored")
        arrays[name] = arr
    raw = bytes(safetensors.numpy.save(arrays, metadata=dict(metadata)))
    # The library writes the metadata in hash order (a Rust HashMap: it differs from one process to the
    # next), so the same model would give different bytes. The header is rewritten with the metadata in
    # sorted order; the data section and its offsets are untouched.
    (n,) = struct.unpack_from("<Q", raw)
    header = json.loads(raw[8 : 8 + n])
    if "__metadata__" in header:
        header["__metadata__"] = dict(sorted(header["__metadata__"].items()))
    head = json.dumps(header, separators=(",", ":")).encode()
    head += b" " * (-len(head) % 8)  # the format aligns the data to 8 bytes
    return struct.pack("<Q", len(head)) + head + raw[8 + n :]


def decode_safetensors(data: bytes, source: str) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    """Tensors and metadata of a safetensors byte string; CapsctlError naming `source` on any defect.

    The safetensors library checks the container (header length and JSON, dtypes, shapes that fit
    their bytes, offsets that cover the data exactly: no hole, overlap, stray tail or truncation).
    On top: the dtypes capsctl reads, and no name given twice (the library keeps the last silently).
    """
    try:
        entries = safetensors.deserialize(data)
    except safetensors.SafetensorError as e:
        reason = " ".join(str(e).removeprefix("Error while deserializing:").split())
        raise CapsctlError(f"{source}: damaged safetensors file ({reason})") from None
    # The library has validated the header; it is read again only for __metadata__ and repeated names.
    (n,) = struct.unpack_from("<Q", data)
    try:
        header = json.loads(data[8 : 8 + n], object_pairs_hook=_no_duplicates)
    except _DuplicateKey as e:
        raise CapsctlError(f"{source}: damaged safetensors file (header names {e.args[0]!r} twice)") from None
    tensors: dict[str, np.ndarray] = {}
    for name, info in entries:
        dtype = _DTYPES.get(info["dtype"])
        if dtype is None:
            raise CapsctlError(f"{source}: tensor {name!r} has unsupported dtype {info['dtype']!r}")
        arr = np.frombuffer(info["data"], dtype=dtype).reshape(info["shape"])
        # safetensors 0.8 hands each tensor a bytearray of its own (writable); copy only read-only bytes
        tensors[name] = arr if arr.flags.writeable else arr.copy()
    return tensors, dict(header.get("__metadata__") or {})


class _DuplicateKey(Exception):
    pass


def _no_duplicates(pairs: list[tuple[str, object]]) -> dict[str, object]:
    # json.loads, like the library, keeps the last of two equal keys: readers may disagree on such a file
    out: dict[str, object] = {}
    for key, value in pairs:
        if key in out:
            raise _DuplicateKey(key)
        out[key] = value
    return out


def read_safetensors(path: str | os.PathLike[str]) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    return decode_safetensors(read_user_file(path, "a .safetensors file"), str(Path(path)))


def other_format(fmt: str) -> str:
    """What to say of a native export that names a weight-file contract version other than this one's."""
    return (
        f"format is {fmt!r}, but this capsctl reads {MODEL_FORMAT!r} (a file from another capsctl "
        "version: open it with that version)"
    )


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

def save_model(
    path: str | os.PathLike[str],
    spec: ModelSpec,
    weights: Mapping[str, np.ndarray],
    extra: Mapping[str, str] | None = None,
) -> None:
    """Write a model file; `extra` adds metadata entries (e.g. "provenance") beside format and spec."""
    check_weights(spec, weights, str(path))
    meta = {**(extra or {}), "format": MODEL_FORMAT, "spec": spec.to_json()}
    atomic_write_bytes(path, encode_safetensors(weights, meta))


def load_model(path: str | os.PathLike[str]) -> tuple[ModelSpec, Weights]:
    """Read and fully validate a model file; no framework is touched."""
    p = Path(path)
    _refuse_a_stopped_run(p)
    data = read_user_file(p, "a .safetensors model file")
    try:
        tensors, meta = decode_safetensors(data, str(p))
    except CapsctlError:
        _refuse_something_else(p, data)  # (only then: a model's header length may begin with those bytes)
        raise
    if meta.get("format") == CHECKPOINT_FORMAT:
        raise CapsctlError(
            f"{p}: a run's training checkpoint, not a model; give the run's model.safetensors (written "
            f"when the run finishes; capsctl train --resume {p.parent} finishes a stopped one)"
        )
    spec = spec_from_metadata(meta, str(p), MODEL_FORMAT)
    check_weights(spec, tensors, str(p))
    return spec, tensors


# what else a file given as MODEL often is, by its first bytes: the way forward for each
_NOT_A_MODEL = (
    (b"PK\x03\x04", "a zip archive (a .keras or torch export?), not a capsctl model; `capsctl import` turns "
                    "an export back into one"),
    (b"\x80", "a pickle (a torch.save export?), not a capsctl model; `capsctl import` turns an export back "
             "into one"),
    (b"\x89PNG", "an image, not a model (the model comes first: capsctl COMMAND MODEL IMAGE)"),
    (b"\xff\xd8\xff", "an image, not a model (the model comes first: capsctl COMMAND MODEL IMAGE)"),
)


def _refuse_a_stopped_run(p: Path) -> None:
    """A run folder, or the model of a run stopped before it was written: the file to give or the command
    that finishes the run."""
    from capsctl.training.run_folder import CHECKPOINT_FILE, MODEL_FILE  # (run_folder imports this module)

    run = p if p.is_dir() else p.parent
    stopped = (run / CHECKPOINT_FILE).is_file() and not (run / MODEL_FILE).exists()
    if p.is_dir() and (p / MODEL_FILE).is_file():
        raise CapsctlError(f"{p}: a run folder; give its model: {p / MODEL_FILE}")
    if (p.is_dir() or (p.name == MODEL_FILE and not p.exists())) and stopped:
        raise CapsctlError(
            f"{p}: no model yet, the run was stopped before its end; capsctl train --resume {run} finishes it"
        )


def _refuse_something_else(p: Path, data: bytes) -> None:
    """A file that is not a safetensors file but another thing often given as MODEL: the way forward."""
    if p.suffix.lower() == ".onnx":
        raise CapsctlError(f"{p}: an ONNX export; give the .safetensors model it was exported from")
    for magic, what in _NOT_A_MODEL:
        if data.startswith(magic):
            raise CapsctlError(f"{p}: {what}")
