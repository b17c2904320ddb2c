"""The weight-file container is the safetensors library's: every damaged case is refused by it (or by the
checks capsctl keeps on top) with one line naming the file; files written by the hand-written encoder
capsctl used before still load; what capsctl writes the reference loader reads."""

from __future__ import annotations

import base64
import json
import struct
import zlib

import numpy as np
import pytest

from capsctl.errors import CapsctlError
from capsctl.model.spec import ModelSpec
from capsctl.model.weights import (
    MODEL_FORMAT,
    decode_safetensors,
    encode_safetensors,
    init_weights,
    load_model,
)

from ._helpers import join_safetensors, rewrite_header, split_safetensors

SPEC = ModelSpec(head="pool")
SOURCE = "dir/m.safetensors"


def _base() -> bytes:
    return encode_safetensors(init_weights(SPEC, 0), {"format": MODEL_FORMAT, "spec": SPEC.to_json()})


def _edit(change):
    return lambda data: rewrite_header(data, change)


def _set(name: str, **fields):
    return _edit(lambda h: h[name].update(fields))


def _shift(after: int, by: int, h: dict) -> None:
    for key, info in h.items():
        if key != "__metadata__" and info["data_offsets"][0] >= after:
            info["data_offsets"] = [o + by for o in info["data_offsets"]]


def _hole_after(name: str):
    def mutate(data: bytes) -> bytes:
        header, body = split_safetensors(data)
        end = header[name]["data_offsets"][1]
        _shift(end, 16, header)
        return join_safetensors(header, body[:end] + b"\0" * 16 + body[end:])

    return mutate


def _hole_in_front(data: bytes) -> bytes:
    header, body = split_safetensors(data)
    _shift(0, 16, header)
    return join_safetensors(header, b"\0" * 16 + body)


def _named_twice(data: bytes) -> bytes:
    # the same entry again: the library keeps the last of two equal keys, silently
    header, body = split_safetensors(data)
    text = json.dumps(header)
    return join_safetensors(text[:-1] + ', "trunk.0.bias": ' + json.dumps(header["trunk.0.bias"]) + "}", body)


def _named_twice_other_dtype(data: bytes) -> bytes:
    # two readers keeping different entries would read different tensors
    header, body = split_safetensors(data)
    text = json.dumps(header)
    other = dict(header["trunk.0.bias"], dtype="I32")
    return join_safetensors(text[:-1] + ', "trunk.0.bias": ' + json.dumps(other) + "}", body)


def _metadata_twice(data: bytes) -> bytes:
    header, body = split_safetensors(data)
    return join_safetensors(json.dumps(header)[:-1] + ', "__metadata__": {"format": "x"}}', body)


def _overlap(h: dict) -> None:
    h["trunk.1.bias"]["data_offsets"] = h["trunk.0.bias"]["data_offsets"]


def _past_the_end(h: dict) -> None:
    h["trunk.1.bias"]["data_offsets"] = [10**7, 10**7 + 256]


# case: (mutation, a fragment of the reason). Who refuses: (L) the library, (C) capsctl's check on top.
CASES = {
    "empty file (L)": (lambda d: b"", "header too small"),
    "5 bytes (L)": (lambda d: d[:5], "header too small"),
    "truncated in the data (L)": (lambda d: d[: len(d) // 2], "not fully covered"),
    "last 7 bytes cut (L)": (lambda d: d[:-7], "not fully covered"),
    "cut in the header (L)": (lambda d: d[:40], "invalid header length"),
    "header length = file length (L)": (lambda d: struct.pack("<Q", len(d)) + d[8:], "invalid header length"),
    "header length 10**9 (L)": (lambda d: struct.pack("<Q", 10**9) + d[8:], "header too large"),
    "header length 2**63 (L)": (lambda d: struct.pack("<Q", 2**63) + d[8:], "header too large"),
    "header not JSON (L)": (lambda d: d[:8] + b"#" + d[9:], "invalid JSON in header"),
    "header not UTF-8 (L)": (lambda d: d[:8] + b"\xff" + d[9:], "invalid UTF-8 in header"),
    "header not an object (L)": (lambda d: struct.pack("<Q", 8) + b"[]      ", "invalid JSON in header"),
    "negative offset (L)": (_set("trunk.0.bias", data_offsets=[-16, 0]), "integer `-16`"),
    "reversed offsets (L)": (_edit(lambda h: h["trunk.0.bias"].update(
        data_offsets=h["trunk.0.bias"]["data_offsets"][::-1])), "invalid offset for tensor `trunk.0.bias`"),
    "overlapping tensors (L)": (_edit(_overlap), "invalid offset for tensor"),
    "offsets past the data (L)": (_edit(_past_the_end), "invalid offset"),
    "hole between tensors (L)": (_hole_after("trunk.0.bias"), "invalid offset"),
    "hole before the first tensor (L)": (_hole_in_front, "invalid offset"),
    "stray tail (L)": (lambda d: d + b"\0" * 16, "not fully covered"),
    "shape does not fit its bytes (L)": (_set("trunk.0.bias", shape=[65]), "invalid shape"),
    "shape overflows (L)": (_set("trunk.0.bias", shape=[2**40] * 3), "overflow"),
    "shape negative (L)": (_set("trunk.0.bias", shape=[-64]), "integer `-64`"),
    "shape not a list (L)": (_set("trunk.0.bias", shape="4"), "expected a sequence"),
    "unknown dtype (L)": (_set("trunk.0.bias", dtype="XYZ"), "unknown variant `XYZ`"),
    "dtype not a string (L)": (_set("trunk.0.bias", dtype=["F32"]), "invalid JSON in header"),
    "offsets not a pair (L)": (_set("trunk.0.bias", data_offsets=[0]), "expected a tuple of size 2"),
    "entry not an object (L)": (_edit(lambda h: h.update({"trunk.0.bias": 3})), "expected struct TensorInfo"),
    "metadata value not a string (L)": (_edit(lambda h: h["__metadata__"].update(spec=1)),
                                        "expected a string"),
    "metadata not a map (L)": (_edit(lambda h: h.update({"__metadata__": []})), "expected a map"),
    "__metadata__ twice (L)": (_metadata_twice, "duplicate field `__metadata__`"),
    "tensor named twice, same entry (C)": (_named_twice, "header names 'trunk.0.bias' twice"),
    "tensor named twice, other dtype (C)": (_named_twice_other_dtype, "header names 'trunk.0.bias' twice"),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_damaged_containers_are_refused_in_one_line_naming_the_file(case):
    mutate, reason = CASES[case]
    with pytest.raises(CapsctlError) as info:
        decode_safetensors(mutate(_base()), SOURCE)
    message = str(info.value)
    assert message.startswith(f"{SOURCE}: damaged safetensors file ("), message
    assert reason in message and "\n" not in message, message


@pytest.mark.parametrize("dtype", ["F16", "BF16", "F8_E4M3", "I32", "BOOL"])
def test_dtypes_capsctl_does_not_store_are_refused_by_name(dtype):
    # valid containers (the shape fits the bytes); safetensors.numpy.load would raise KeyError for BF16/F8
    header, body = split_safetensors(_base())
    size = header["trunk.0.bias"]["data_offsets"][1] - header["trunk.0.bias"]["data_offsets"][0]
    bits = {"F16": 16, "BF16": 16, "F8_E4M3": 8, "I32": 32, "BOOL": 8}[dtype]
    header["trunk.0.bias"].update(dtype=dtype, shape=[size * 8 // bits])
    message = f"^{SOURCE}: tensor 'trunk.0.bias' has unsupported dtype '{dtype}'$"
    with pytest.raises(CapsctlError, match=message):
        decode_safetensors(join_safetensors(header, body), SOURCE)


def test_capsctl_checks_on_top_of_the_container(tmp_path):
    w = init_weights(SPEC, 0)
    p = tmp_path / "m.safetensors"
    p.write_bytes(encode_safetensors(dict(w, **{"trunk.0.bias": w["trunk.0.bias"].astype(np.float64)}),
                                     {"format": MODEL_FORMAT, "spec": SPEC.to_json()}))
    with pytest.raises(CapsctlError, match="trunk.0.bias' is float64, expected float32"):
        load_model(p)
    p.write_bytes(encode_safetensors(w, {"spec": SPEC.to_json()}))
    with pytest.raises(CapsctlError, match="format is None"):
        load_model(p)
    with pytest.raises(CapsctlError, match="cannot be stored"):
        encode_safetensors({"x": np.zeros(2, np.float16)}, {})


def test_the_writer_stores_views_and_byte_orders_as_values():
    # safetensors.numpy.save reads raw memory: a strided view would be stored scrambled without the copy
    a = np.arange(24, dtype=np.float32).reshape(4, 6)
    tensors = {"view": a[:, ::2], "T": a.T, "big": a.astype(">f4"), "f64": np.arange(3.0)}
    back, meta = decode_safetensors(encode_safetensors(tensors, {"k": "v"}), "x")
    assert meta == {"k": "v"}
    for name, arr in tensors.items():
        assert back[name].dtype == arr.dtype.newbyteorder("<") and np.array_equal(back[name], arr), name
    back["view"][0, 0] = 1.0  # loaded arrays are writable


# Written by capsctl's hand-written encoder (capsctl/model/weights.py before it used the library):
# the tiny pool model below with init_weights(seed 7), and a container of every dtype capsctl stores.
OLD_MODEL = (
    "eNpjYGYAg2ql+Pjc1JLElMSSxPh4JatqpbT8otzEEiUrpeTEguLkkhx9QyUdpeKC1GSgUHWMUmZefHJGYl5eak5xjJKVgqGOQoxS"
    "XmlufHJOYnFxKkTMACRYUlSalw3iRgN1lVQWpILYMUrJ+XllMUogBWmZOSWpRWAdRiB+dmoR0FQwtzYWJJCRmpgC0VSQn58D0QRy"
    "VGkO2CygsSmZuWALzUBSRfmlJZl56WADjZEEIEYUl0IMKC4sTSzOQBPLSCxKBVsFdHQqzEeZeQWlJWDT8kpzcmp14O4AW52RmZKS"
    "mge2q7ZWqVYH7Fo9oFBxqoFeUmZiMSgsU0D+Boabm7ERKBAzEkG8aONYHSVweOenpRWnlgBVRhvoGBrFohkCCQ/cxhjpYDHIEChq"
    "hmqSIQHnGBpgGmNspmOOYQwhBxnrYDPK3EzH0BJsFjhF6BEKHSMsnrI00zEyMEE2g3DgGOkY6mAxC2iOjhEoiGoVQIABCTyYq2Z/"
    "8H7/XsFPd/a59vzYF1PDub+54NteBiJBdcMp64N3p9g6R+nYr59x2s7mn6bdE2Etez3eY/sKE9/sOzRFxk58kdz+w42K+y13LrXJ"
    "F7bZKywtaO9yxtjulPJcGwOT7t0tS9fv23NBc/+yP1f3RUxvtat2v7CPtdV0X+48nf2nZj21W5L4Yd/yNQv3sXiz2Jt+jbSZ3fDR"
    "DmZ/hIapXcc5fnu1ecftlvw4tu/Dxgn7ltqy23+RMd4vP+OFHQD+g0b7"
)
OLD_MIXED = (
    "eNqTYGQAg2ql+Pjc1JLElMSSxPh4JatqpbT8otzEEiUrpQp9QyUdpbz8klQgJz8nRaG8KLMktUipVkcpEaQwpaSyACTlZmwEVFec"
    "kQjiRRvpGMfqKIGNy09LK04tKQYKGugYmcQC9WUi6/M0M0HWh6nLyETHxACkrbgktQDFRhSdhpg6TQx0TCxAOkuRtYVaIOnC4koT"
    "Cx1Tw9jaWgUggIROgz2QcAAiIG4A4gUOf/9DAAsDMtBw+M/ADgBxbGLG"
)
OLD_SPEC = ModelSpec.from_dict(
    {"trunk": [{"type": "conv", "filters": 2, "kernel": 2}], "head": "pool", "pool": {"hidden": 3}}
)


def _old(blob: str) -> bytes:
    return zlib.decompress(base64.b64decode(blob))


def test_files_written_by_the_old_encoder_still_load(tmp_path):
    p = tmp_path / "old.safetensors"
    p.write_bytes(_old(OLD_MODEL))
    spec, w = load_model(p)
    assert spec == OLD_SPEC
    want = init_weights(OLD_SPEC, 7)
    assert set(w) == set(want) and all(w[k].tobytes() == want[k].tobytes() for k in want)
    tensors, meta = decode_safetensors(_old(OLD_MIXED), "old")
    assert meta == {"format": "x/1", "note": "old writer"}
    assert np.array_equal(tensors["a"], np.arange(6, dtype=np.float32).reshape(2, 3))
    assert tensors["step"].dtype == np.float64 and tensors["step"].tolist() == [12.0]
    assert tensors["i"].tolist() == [-3, 4] and tensors["u"].tolist() == [255, 0, 7]


def test_new_files_read_the_same_in_the_reference_loader(tmp_path):
    from safetensors import safe_open
    from safetensors.numpy import load_file

    p = tmp_path / "new.safetensors"
    meta = {"format": MODEL_FORMAT, "spec": OLD_SPEC.to_json()}
    p.write_bytes(encode_safetensors(init_weights(OLD_SPEC, 7), meta))
    ref = load_file(p)
    want = init_weights(OLD_SPEC, 7)
    assert all(ref[k].tobytes() == want[k].tobytes() for k in want)
    with safe_open(p, framework="np") as f:
        assert f.metadata() == meta


def test_the_same_model_gives_the_same_bytes_in_every_process() -> None:
    # the library writes metadata in hash order (different per process); capsctl's files must not vary
    import subprocess
    import sys

    code = (
        "import hashlib, numpy as np; from capsctl.model.weights import encode_safetensors; "
        "b = encode_safetensors({'w': np.arange(4, dtype=np.float32)}, "
        "{'format': 'capsctl/1', 'spec': '{}', 'provenance': '{}', 'more': 'x'}); "
        "print(hashlib.sha256(b).hexdigest())"
    )
    digests = {subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
               for _ in range(4)}
    assert len(digests) == 1
