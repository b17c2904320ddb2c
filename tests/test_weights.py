import struct

import numpy as np
import pytest

from capsctl.errors import CapsctlError
from capsctl.model.spec import ModelSpec
from capsctl.model.weights import (
    MODEL_FORMAT,
    decode_safetensors,
    encode_safetensors,
    expected_shapes,
    init_weights,
    load_model,
    save_model,
)

from ._helpers import rewrite_header


@pytest.mark.parametrize(
    "spec", [ModelSpec(), ModelSpec(head="pool"), ModelSpec().with_capsule(shared=False, num_inputs=64)]
)
def test_round_trip_is_exact(tmp_path, spec):
    w = init_weights(spec, 3)
    save_model(tmp_path / "m.safetensors", spec, w)
    spec2, w2 = load_model(tmp_path / "m.safetensors")
    assert spec2 == spec
    assert set(w2) == set(expected_shapes(spec))
    for k in w:
        assert w2[k].dtype == np.float32
        assert w2[k].tobytes() == w[k].tobytes()


def test_file_is_standard_safetensors(tmp_path):
    from safetensors.numpy import load_file, safe_open

    spec = ModelSpec(head="pool")
    w = init_weights(spec, 0)
    save_model(tmp_path / "m.safetensors", spec, w)
    loaded = load_file(tmp_path / "m.safetensors")  # the reference implementation reads our file
    assert all(np.array_equal(loaded[k], w[k]) for k in w)
    with safe_open(tmp_path / "m.safetensors", framework="np") as f:
        meta = f.metadata()
    assert meta["format"] == MODEL_FORMAT
    assert ModelSpec.from_json(meta["spec"]) == spec


def test_we_read_files_written_by_the_reference_writer(tmp_path):
    from safetensors.numpy import save_file

    spec = ModelSpec()
    w = init_weights(spec, 0)
    save_file(w, tmp_path / "m.safetensors", metadata={"format": MODEL_FORMAT, "spec": spec.to_json()})
    _, w2 = load_model(tmp_path / "m.safetensors")
    assert all(np.array_equal(w2[k], w[k]) for k in w)


def test_init_is_glorot_uniform_with_zero_bias():
    w = init_weights(ModelSpec(), 0)
    limit = np.sqrt(6 / (9 * 64 + 9 * 128))  # trunk.2: 3x3x64 -> 128
    k = w["trunk.2.kernel"]
    assert np.abs(k).max() <= limit and np.abs(k).max() > 0.95 * limit
    assert not w["trunk.2.bias"].any()
    assert np.array_equal(init_weights(ModelSpec(), 0)["trunk.0.kernel"], w["trunk.0.kernel"])
    assert not np.array_equal(init_weights(ModelSpec(), 1)["trunk.0.kernel"], w["trunk.0.kernel"])


def _model_bytes(spec=None):
    spec = spec or ModelSpec(head="pool")
    return encode_safetensors(init_weights(spec, 0), {"format": MODEL_FORMAT, "spec": spec.to_json()})


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (lambda d: d[:5], "damaged safetensors file .header too small"),
        (lambda d: d[: len(d) // 2], "damaged safetensors file .*not fully covered"),
        (lambda d: struct.pack("<Q", 10**9) + d[8:], "damaged safetensors file .header too large"),
        (lambda d: d[:8] + b"#" + d[9:], "damaged safetensors file .invalid JSON"),
        (lambda d: rewrite_header(d, lambda h: h["trunk.0.bias"].update(data_offsets=[-4, 252])),
         "integer `-4`"),
        (lambda d: rewrite_header(d, lambda h: h["trunk.0.bias"].update(dtype="F16", shape=[128])),
         "unsupported dtype 'F16'"),
        (lambda d: rewrite_header(d, lambda h: h["trunk.0.bias"].update(shape=[65])), "invalid shape"),
        (lambda d: rewrite_header(
            d, lambda h: h["trunk.1.bias"].update(data_offsets=h["trunk.0.bias"]["data_offsets"])),
         "invalid offset for tensor"),
    ],
)
def test_broken_containers_are_refused_with_a_reason(mutate, message):
    with pytest.raises(CapsctlError, match=message):
        decode_safetensors(mutate(_model_bytes()), "m.safetensors")


def test_model_checks_name_the_first_mismatch(tmp_path):
    spec = ModelSpec(head="pool")
    w = init_weights(spec, 0)
    p = tmp_path / "m.safetensors"

    def write(tensors, meta):
        p.write_bytes(encode_safetensors(tensors, meta))

    meta = {"format": MODEL_FORMAT, "spec": spec.to_json()}
    write({k: v for k, v in w.items() if k != "head.dense1.bias"}, meta)
    with pytest.raises(CapsctlError, match="head.dense1.bias.*missing"):
        load_model(p)
    write({**w, "head.dense0.kernel": np.zeros((64, 128), np.float32)}, meta)
    with pytest.raises(CapsctlError, match=r"head.dense0.kernel.*\[64, 128\].*\[128, 128\]"):
        load_model(p)
    write({**w, "head.dense0.bias": w["head.dense0.bias"].astype(np.float64)}, meta)
    with pytest.raises(CapsctlError, match="float64"):
        load_model(p)
    bad = dict(w)
    bad["trunk.0.kernel"] = w["trunk.0.kernel"].copy()
    bad["trunk.0.kernel"][0, 0, 0, 0] = np.nan
    write(bad, meta)
    with pytest.raises(CapsctlError, match="NaN"):
        load_model(p)
    write(w, {"format": "other/1", "spec": spec.to_json()})
    with pytest.raises(CapsctlError, match="format"):
        load_model(p)
    write(w, {"format": MODEL_FORMAT, "spec": ModelSpec().to_json()})  # capsule spec, pool tensors
    with pytest.raises(CapsctlError, match="head.capsule.kernel"):
        load_model(p)
    with pytest.raises(CapsctlError, match="no such file"):
        load_model(tmp_path / "absent.safetensors")


def test_save_refuses_bad_weights_and_leaves_nothing(tmp_path):
    spec = ModelSpec()
    w = init_weights(spec, 0)
    w["head.capsule.kernel"] = w["head.capsule.kernel"][:, :10]
    with pytest.raises(CapsctlError):
        save_model(tmp_path / "m.safetensors", spec, w)
    assert list(tmp_path.iterdir()) == []
