"""Bad input to every command: one line on stderr naming the file or option and the problem, exit code
2, no traceback (unless --debug), and nothing written or half-written.

Most cases run the CLI in-process (fast); a few run it as a subprocess, as a user would.
"""

from __future__ import annotations

import contextlib
import io
import json
import pickle
import struct
import subprocess
import sys
import zipfile
import zlib
from pathlib import Path

import numpy as np
import pytest

from capsctl.data import idx
from capsctl.data.datasets import FILES as IDX_NAMES
from capsctl.errors import CapsctlError
from capsctl.model.spec import ModelSpec
from capsctl.model.weights import MODEL_FORMAT, encode_safetensors, init_weights

from ._helpers import (
    TINY,
    assert_one_line_error,
    gz,
    idx_bytes,
    join_safetensors,
    png_bytes,
    rewrite_header,
    run_cli,
    split_safetensors,
    write_set,
)

FILES = {role: name + ".gz" for role, name in IDX_NAMES.items()}  # the files write_set writes


def spec_dict(**changes) -> dict:
    d = json.loads(json.dumps(TINY))
    for key, value in changes.items():
        if key == "capsule":
            d["capsule"].update(value)
        else:
            d[key] = value
    return d


def model_bytes(spec: ModelSpec | None = None, weights=None, meta=None) -> bytes:
    spec = spec or ModelSpec.from_dict(TINY)
    weights = init_weights(spec, 0) if weights is None else weights
    meta = {"format": MODEL_FORMAT, "spec": spec.to_json()} if meta is None else meta
    return encode_safetensors(weights, meta)


@pytest.fixture(scope="module")
def arrays(mnist_dir):
    """64 training and 32 test images of real MNIST (uint8) with their labels."""
    src = {role: idx.read_idx(mnist_dir / name) for role, name in FILES.items()}
    return {
        "train-images": np.ascontiguousarray(src["train-images"][:64]),
        "train-labels": np.ascontiguousarray(src["train-labels"][:64]),
        "t10k-images": np.ascontiguousarray(src["t10k-images"][:32]),
        "t10k-labels": np.ascontiguousarray(src["t10k-labels"][:32]),
    }


@pytest.fixture(scope="module")
def good_data(tmp_path_factory, arrays) -> Path:
    folder = tmp_path_factory.mktemp("good-data")
    write_set(folder, arrays)
    return folder


@pytest.fixture(scope="module")
def good_model(tmp_path_factory) -> Path:
    p = tmp_path_factory.mktemp("model") / "tiny.safetensors"
    p.write_bytes(model_bytes())
    return p


@pytest.fixture
def cache(tmp_path, monkeypatch) -> Path:
    """A private user cache, so `data fetch` can be checked to have written nothing."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    return tmp_path / "xdg"


def spec_file(tmp_path: Path, d: dict | None = None) -> Path:
    p = tmp_path / "spec.json"
    p.write_text(json.dumps(d or TINY))
    return p


# -- broken IDX data -----------------------------------------------------------------------------

def _corrupt_deflate(raw: bytes) -> bytes:
    data = bytearray(gz(raw))
    for i in range(20, min(len(data) - 8, 400), 7):  # inside the deflate stream, past the gzip header
        data[i] ^= 0xA5
    return bytes(data)


def _with_count(raw: bytes, count: int) -> bytes:
    """An IDX file whose header claims `count` items."""
    return raw[:4] + struct.pack(">I", count) + raw[8:]


# name -> (role to damage, which file gets it, new bytes from the role's array, words the message holds)
def _idx_mutations():
    return {
        "truncated": ("images", lambda a: gz(idx_bytes(a)[:-100]), ["truncated"]),
        "wrong magic": ("images", lambda a: gz(b"\x00\x00\x07\x03" + idx_bytes(a)[4:]), ["bad IDX magic"]),
        "count too high": ("images", lambda a: gz(_with_count(idx_bytes(a), len(a) + 5)),
                           ["header says", "truncated"]),
        "count too low": ("images", lambda a: gz(_with_count(idx_bytes(a), len(a) - 1)), ["trailing bytes"]),
        "too many dimensions": ("images", lambda a: gz(b"\x00\x00\x08\x09" + idx_bytes(a)[4:]),
                                ["dimensions"]),
        "length mismatch": ("labels", lambda a: gz(idx_bytes(a[:-3])), ["labels"]),
        "corrupt gzip": ("images", lambda a: _corrupt_deflate(idx_bytes(a)), ["corrupt gzip"]),
        "truncated gzip": ("images", lambda a: gz(idx_bytes(a))[:-30], ["gzip stream is truncated"]),
        "stray bytes after gzip": ("images", lambda a: gz(idx_bytes(a)) + b"trailing junk", ["stray bytes"]),
        "empty file": ("images", lambda a: b"", ["too short"]),
        "not IDX at all": ("images", lambda a: b"<html>404 Not Found</html>", ["bad IDX magic"]),
        "float images": ("images", lambda a: gz(idx_bytes(a.astype(">f4"), 0x0D)), ["unsigned-byte"]),
        "2-D images": ("images", lambda a: gz(idx_bytes(a.reshape(len(a), -1))), ["3 dimensions"]),
        "label out of range": ("labels", lambda a: gz(idx_bytes(np.where(np.arange(len(a)) == 3, 42, a))),
                               ["label 42", "out of range"]),
        "no images": ("images", lambda a: gz(idx_bytes(a[:0])), ["no images"]),
        "missing file": ("images", None, ["missing"]),
    }


IDX_CASES = sorted(_idx_mutations())


def _damaged_set(tmp_path: Path, arrays, case: str, split: str) -> tuple[Path, str]:
    role_kind, make, _ = _idx_mutations()[case]
    folder = tmp_path / "data"
    write_set(folder, arrays)
    role = f"{split}-{role_kind}"
    if make is None:
        (folder / FILES[role]).unlink()
    else:
        (folder / FILES[role]).write_bytes(make(arrays[role]))
    return folder, FILES[role].removesuffix(".gz")


@pytest.mark.parametrize("case", IDX_CASES)
def test_train_refuses_broken_idx_and_writes_nothing(tmp_path, capsys, arrays, case):
    data, fname = _damaged_set(tmp_path, arrays, case, "train")
    run = tmp_path / "runs" / "r"
    code, out, err = run_cli(["train", "--spec", spec_file(tmp_path), "--data-dir", data, "--epochs", "1",
                            "--out", run, "-q"], capsys)
    assert_one_line_error(code, out, err, fname, *_idx_mutations()[case][2])
    assert not (tmp_path / "runs").exists()


@pytest.mark.parametrize("command", ["eval", "eval-pairs"])
@pytest.mark.parametrize("case", IDX_CASES)
def test_eval_refuses_broken_test_idx(tmp_path, capsys, arrays, good_model, case, command):
    data, fname = _damaged_set(tmp_path, arrays, case, "t10k")
    code, out, err = run_cli([command, good_model, "--data-dir", data], capsys)
    assert_one_line_error(code, out, err, fname, *_idx_mutations()[case][2])


@pytest.mark.parametrize("split", ["train", "t10k"])
@pytest.mark.parametrize("case", IDX_CASES)
def test_data_fetch_from_refuses_broken_idx_and_copies_nothing(tmp_path, capsys, cache, arrays, case, split):
    data, fname = _damaged_set(tmp_path, arrays, case, split)
    code, out, err = run_cli(["data", "fetch", "mnist", "--from", data], capsys)
    want = ["four IDX files"] if case == "missing file" else [fname, *_idx_mutations()[case][2]]
    assert_one_line_error(code, out, err, *want)
    assert not (cache / "capsctl" / "mnist").exists()


def test_data_fetch_from_refuses_train_and_test_of_different_sizes(tmp_path, capsys, cache, arrays):
    data = tmp_path / "data"
    write_set(data, {**arrays, "t10k-images": np.ascontiguousarray(arrays["t10k-images"][:, :20, :20])})
    code, out, err = run_cli(["data", "fetch", "mnist", "--from", data], capsys)
    assert_one_line_error(code, out, err, "--from", "28x28", "20x20")
    assert not (cache / "capsctl" / "mnist").exists()


def test_gzip_bomb_is_refused(tmp_path, capsys, arrays, good_model, monkeypatch):
    # The real limit is 2 GiB; a smaller one here shows the guard without using 2 GiB of memory.
    monkeypatch.setattr(idx, "_MAX_BYTES", 1 << 20)
    data = tmp_path / "data"
    write_set(data, arrays)
    bomb = idx_bytes(np.zeros((3000, 28, 28), np.uint8))  # 2.3 MB that gzip to a few kB
    (data / FILES["t10k-images"]).write_bytes(gz(bomb))
    code, out, err = run_cli(["eval", good_model, "--data-dir", data], capsys)
    assert_one_line_error(code, out, err, FILES["t10k-images"], "decompresses to more than")


def test_multi_member_gzip_is_read_whole(tmp_path, arrays):
    raw = idx_bytes(arrays["t10k-images"])
    p = tmp_path / "t10k-images-idx3-ubyte.gz"
    p.write_bytes(gz(raw[:1000]) + gz(raw[1000:]))  # `cat a.gz b.gz` is a valid gzip file
    assert np.array_equal(idx.read_idx(p), arrays["t10k-images"])


# -- broken weight files --------------------------------------------------------------------------

def _set(name: str, **fields):
    return lambda h: h[name].update(fields)


def _with_weights(edit):
    spec = ModelSpec.from_dict(TINY)
    w = init_weights(spec, 0)
    edit(w)
    return model_bytes(spec, w)


def _nan(w):
    w["trunk.1.kernel"][0, 0, 0, 0] = np.nan


def _inf(w):
    w["head.capsule.kernel"][1, 2] = -np.inf


def _duplicate_key(d: bytes) -> bytes:
    header, body = split_safetensors(d)
    text = json.dumps(header)
    return join_safetensors(text[:-1] + ',"trunk.0.bias":' + json.dumps(header["trunk.0.bias"]) + "}", body)


TINY_JSON = ModelSpec.from_dict(TINY).to_json()

WEIGHT_CASES = {
    "truncated": (lambda d: d[: len(d) // 2], ["damaged safetensors file (", "not fully covered"]),
    "cut in the header": (lambda d: d[:40], ["damaged safetensors file (invalid header length)"]),
    "header length past the end": (lambda d: struct.pack("<Q", len(d)) + d[8:], ["invalid header length"]),
    "absurd header length": (lambda d: struct.pack("<Q", 2**63) + d[8:], ["header too large"]),
    "header not JSON": (lambda d: d[:8] + b"\xff" + d[9:], ["invalid UTF-8 in header"]),
    "header not an object": (lambda d: struct.pack("<Q", 8) + b"[]      ", ["invalid JSON in header"]),
    "negative offset": (lambda d: rewrite_header(d, _set("trunk.0.bias", data_offsets=[-16, 0])),
                        ["integer `-16`"]),
    "reversed offsets": (lambda d: rewrite_header(d, lambda h: h["trunk.0.bias"].update(
        data_offsets=h["trunk.0.bias"]["data_offsets"][::-1])), ["invalid offset for tensor `trunk.0.bias`"]),
    "overlapping offsets": (lambda d: rewrite_header(d, lambda h: h["trunk.1.bias"].update(
        data_offsets=h["trunk.0.bias"]["data_offsets"])), ["invalid offset for tensor"]),
    "offset past the end": (lambda d: rewrite_header(d, lambda h: h["trunk.1.bias"].update(
        data_offsets=[len(d), len(d) + 16])), ["invalid offset"]),
    "stray bytes after the data": (lambda d: d + b"\0" * 16, ["not fully covered"]),
    "float64 tensor": (lambda d: _with_weights(
        lambda w: w.update({"trunk.0.bias": w["trunk.0.bias"].astype(np.float64)})),
        ["trunk.0.bias", "float64"]),
    "unknown dtype": (lambda d: rewrite_header(d, _set("trunk.0.bias", dtype="F16", shape=[8])),
                      ["unsupported dtype"]),
    "dtype not a string": (lambda d: rewrite_header(d, _set("trunk.0.bias", dtype=["F32"])),
                           ["invalid JSON in header"]),
    "shape not a list": (lambda d: rewrite_header(d, _set("trunk.0.bias", shape="4")),
                         ["expected a sequence"]),
    "bytes do not fit shape": (lambda d: rewrite_header(d, _set("trunk.0.bias", shape=[5])),
                               ["invalid shape"]),
    "spec does not match tensors": (lambda d: model_bytes(
        meta={"format": MODEL_FORMAT, "spec": ModelSpec.from_dict(spec_dict(head="pool")).to_json()}),
        ["head.dense0.kernel", "missing"]),
    "wrong shape for the spec": (lambda d: _with_weights(
        lambda w: w.update({"trunk.1.bias": np.zeros(5, np.float32)})), ["trunk.1.bias", "shape"]),
    "extra tensor": (lambda d: _with_weights(lambda w: w.update({"head.extra": np.zeros(2, np.float32)})),
                     ["head.extra", "not part"]),
    "NaN weights": (lambda d: _with_weights(_nan), ["trunk.1.kernel", "NaN"]),
    "infinite weights": (lambda d: _with_weights(_inf), ["head.capsule.kernel", "infinite"]),
    "wrong format": (lambda d: model_bytes(meta={"format": "capsctl/99", "spec": TINY_JSON}), ["format"]),
    "no spec": (lambda d: model_bytes(meta={"format": MODEL_FORMAT}), ["no model spec"]),
    "spec not JSON": (lambda d: model_bytes(meta={"format": MODEL_FORMAT, "spec": "{nope"}),
                      ["spec", "JSON"]),
    "spec out of range": (lambda d: model_bytes(
        meta={"format": MODEL_FORMAT, "spec": json.dumps(spec_dict(capsule={"routings": 0}))}),
        ["capsule.routings"]),
    "metadata not strings": (lambda d: rewrite_header(d, lambda h: h["__metadata__"].update(spec=1)),
                             ["expected a string"]),
    "a tensor named twice": (_duplicate_key, ["trunk.0.bias", "twice"]),
    "empty file": (lambda d: b"", ["damaged safetensors file (header too small)"]),
    "a checkpoint, not a model": (lambda d: model_bytes(meta={"format": "capsctl-checkpoint/1",
                                                              "spec": TINY_JSON}),
                                  ["a run's training checkpoint, not a model", "model.safetensors",
                                   "--resume"]),
    # other things given as MODEL: what they are and the way forward (all said "damaged safetensors file")
    "a zip (a .keras export)": (lambda d: _zip_bytes(), ["a zip archive", "capsctl import"]),
    "a pickle (torch.save)": (lambda d: pickle.dumps({"w": [1.0]}, protocol=2),
                              ["a pickle", "capsctl import"]),
    "a PNG image": (lambda d: b"\x89PNG\r\n\x1a\n" + bytes(40), ["an image, not a model", "comes first"]),
}


def _zip_bytes() -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        z.writestr("metadata.json", "{}")
    return buf.getvalue()


@pytest.mark.parametrize("command", ["eval", "eval-pairs"])
@pytest.mark.parametrize("case", sorted(WEIGHT_CASES))
def test_broken_weight_files_are_refused(tmp_path, capsys, good_data, case, command):
    mutate, words = WEIGHT_CASES[case]
    model = tmp_path / "model.safetensors"
    model.write_bytes(mutate(model_bytes()))
    before = sorted(tmp_path.rglob("*"))
    code, out, err = run_cli([command, model, "--data-dir", good_data], capsys)
    assert_one_line_error(code, out, err, str(model), *words)
    assert sorted(tmp_path.rglob("*")) == before


@pytest.mark.parametrize("command", ["eval", "eval-pairs"])
def test_missing_model_and_folder_as_model(tmp_path, capsys, good_data, command):
    code, out, err = run_cli([command, tmp_path / "absent.safetensors", "--data-dir", good_data], capsys)
    assert_one_line_error(code, out, err, "absent.safetensors", "no such file")
    code, out, err = run_cli([command, tmp_path, "--data-dir", good_data], capsys)
    assert_one_line_error(code, out, err, str(tmp_path), "is a folder")
    # a run folder, and a run stopped before its model was written: the file to give, the way to finish
    run = tmp_path / "run"
    run.mkdir()
    (run / "checkpoint.safetensors").write_bytes(model_bytes(meta={"format": "capsctl-checkpoint/1",
                                                                    "spec": TINY_JSON}))
    for given in (run, run / "model.safetensors"):
        code, out, err = run_cli([command, given, "--data-dir", good_data], capsys)
        assert_one_line_error(code, out, err, "no model yet", f"capsctl train --resume {run} finishes it")
    (run / "model.safetensors").write_bytes(model_bytes())
    code, out, err = run_cli([command, run, "--data-dir", good_data], capsys)
    assert_one_line_error(code, out, err, "a run folder; give its model", str(run / "model.safetensors"))
    (tmp_path / "m.onnx").write_bytes(b"\x08\x07\x12\x07pytorch")
    code, out, err = run_cli([command, tmp_path / "m.onnx", "--data-dir", good_data], capsys)
    assert_one_line_error(code, out, err, "an ONNX export; give the .safetensors model")


# -- a model that does not fit the data ------------------------------------------------------------

MISFITS = {
    "3-channel model": (spec_dict(in_channels=3), ["3-channel", "have 1"]),
    "3-class model": (spec_dict(num_classes=3), ["label", "only 3 classes"]),
    "per-position weights of another size": (spec_dict(capsule={"shared": False, "num_inputs": 7}),
                                             ["fixed to 7"]),
    "trunk bigger than the image": (spec_dict(trunk=[{"type": "conv", "filters": 2, "kernel": 15}] * 3),
                                    ["too small", "43x43"]),
}


@pytest.mark.parametrize("command", ["eval", "eval-pairs", "train"])
@pytest.mark.parametrize("case", sorted(MISFITS))
def test_model_that_does_not_fit_the_data(tmp_path, capsys, good_data, case, command):
    d, words = MISFITS[case]
    if command == "train":
        run = tmp_path / "run"
        code, out, err = run_cli(["train", "--spec", spec_file(tmp_path, d), "--data-dir", good_data,
                                  "--epochs", "1", "--out", run], capsys)
        # (training names the spec field: a hand-written count is what to leave out)
        words = ["num_inputs is 7"] if words == ["fixed to 7"] else words
        assert_one_line_error(code, out, err, "model spec", *words)
        assert not run.exists()
    else:
        spec = ModelSpec.from_dict(d)
        model = tmp_path / "m.safetensors"
        model.write_bytes(model_bytes(spec))
        code, out, err = run_cli([command, model, "--data-dir", good_data, "--limit", "8"], capsys)
        assert_one_line_error(code, out, err, str(model), *words)


# -- options out of range --------------------------------------------------------------------------

TRAIN_OPTIONS = [
    (["--batch-size", "0"], ["--batch-size", "got 0"]),
    (["--batch-size", "100000"], ["--batch-size"]),
    (["--epochs", "-1"], ["--epochs", "got -1"]),
    (["--epochs", "0"], ["--epochs"]),
    (["--epochs", "many"], ["--epochs", "valid integer"]),
    (["--routings", "0"], ["--routings", "got 0"]),
    (["--routings", "101"], ["--routings"]),
    (["--routing", "em"], ["--routing", "'em'"]),
    (["--squash", "tanh"], ["--squash", "'tanh'"]),
    (["--head", "dense"], ["--head", "'dense'"]),
    (["--lr", "0"], ["--lr"]),
    (["--lr", "-1e-3"], ["--lr"]),
    (["--lr", "nan"], ["--lr"]),
    (["--lr", "11"], ["--lr"]),
    (["--shift", "15"], ["--shift"]),
    (["--weight-decay", "-0.1"], ["--weight-decay"]),
    (["--seed", "-1"], ["--seed"]),
    (["--limit", "0"], ["--limit"]),
    (["--recipe", "magic"], ["recipe", "'magic'"]),
    (["--schedule", "cosine"], ["--schedule", "'cosine'"]),
    (["--dataset", "cifar"], ["dataset", "'cifar'"]),
    (["--backend", "jax"], ["unknown backend", "'jax'"]),
    (["--no-such-option"], ["No such option", "--no-such-option"]),
    (["--resume", "elsewhere"], ["--out", "--resume"]),
]


@pytest.mark.parametrize(("args", "words"), TRAIN_OPTIONS,
                         ids=lambda v: " ".join(v) if isinstance(v, list) else None)
def test_train_options_out_of_range(tmp_path, capsys, good_data, args, words):
    run = tmp_path / "run"
    spec = [] if "--head" in args else ["--spec", spec_file(tmp_path)]  # (--spec would override --head)
    code, out, err = run_cli(["train", *spec, "--data-dir", good_data, "--out", run, *args], capsys)
    assert_one_line_error(code, out, err, *words)
    assert not run.exists()


def test_train_file_and_folder_problems(tmp_path, capsys, good_data):
    spec = spec_file(tmp_path)
    cases = [
        (["--spec", tmp_path / "absent.json"], ["--spec", "absent.json", "cannot read"]),
        (["--spec", tmp_path], ["--spec", "cannot read"]),
        (["--data-dir", tmp_path / "nowhere"], ["--data-dir", "no such folder"]),
        (["--data-dir", tmp_path / "empty"], ["--data-dir", "missing"]),
        (["--resume", tmp_path / "not-a-run"], ["--resume", "nothing to resume"]),
    ]
    (tmp_path / "empty").mkdir()
    bad_json = tmp_path / "bad.json"
    bad_json.write_text('{"head": "capsule",')
    cases.append((["--spec", bad_json], ["--spec", "bad.json", "not valid JSON"]))
    binary = tmp_path / "spec.bin"
    binary.write_bytes(b"\x89PNG\r\n\x1a\n\xff\xfe")
    cases.append((["--spec", binary], ["--spec", "spec.bin", "not a text file"]))
    (tmp_path / "u").mkdir()
    unknown = spec_file(tmp_path / "u", {**TINY, "heads": 2})
    cases.append((["--spec", unknown], ["--spec", "unknown field", "'heads'"]))
    a_file = tmp_path / "a-file"
    a_file.write_text("x")
    for extra, words in cases:
        args = ["train", "--data-dir", good_data, "--epochs", "1", "-q"]
        if "--spec" not in extra:
            args += ["--spec", spec]
        if "--resume" not in extra:
            args += ["--out", tmp_path / "run"]
        code, out, err = run_cli([*args, *extra], capsys)
        assert_one_line_error(code, out, err, *words)
        assert not (tmp_path / "run").exists()
    code, out, err = run_cli(["train", "--spec", spec, "--data-dir", good_data, "--out", a_file, "-q"],
                             capsys)
    assert_one_line_error(code, out, err, str(a_file), "is a file")
    assert a_file.read_text() == "x"
    code, out, err = run_cli(["train", "--spec", spec, "--data-dir", good_data, "--out", a_file / "sub",
                              "-q"], capsys)
    assert_one_line_error(code, out, err, "a-file/sub", "cannot create")


def test_train_reads_a_spec_from_a_pipe(tmp_path, capsys, good_data):
    """`--spec /dev/stdin` (or `<(...)`): the file was read a second time for its top-level fields, found
    the pipe empty, and ended in a JSONDecodeError traceback."""
    import os
    import threading

    fifo = tmp_path / "spec.fifo"
    os.mkfifo(fifo)
    writer = threading.Thread(target=lambda: fifo.write_text(json.dumps({**TINY, "num_classes": 10})))
    writer.start()
    done = threading.Event()

    def unblock() -> None:  # a second open of the pipe waits for a writer: give it an empty one, not a hang
        if not done.wait(60):
            fifo.write_text("")

    threading.Thread(target=unblock, daemon=True).start()
    try:
        code, _out, err = run_cli(["train", "--spec", fifo, "--data-dir", good_data, "--epochs", "1",
                                  "--limit", "64", "--out", tmp_path / "run", "-q"], capsys)
    finally:
        done.set()
    writer.join(timeout=10)
    assert code == 0, err
    assert "Traceback" not in err
    assert (tmp_path / "run" / "model.safetensors").exists()


def test_train_nproc_refuses_a_spec_from_a_pipe(tmp_path, capsys, good_data):
    """Each rank of --nproc runs the command line again: a pipe given as --spec is empty (or closed) by
    then, and every rank failed to read it."""
    import os

    fifo = tmp_path / "spec.fifo"
    os.mkfifo(fifo)
    code, out, err = run_cli(["train", "--spec", fifo, "--data-dir", good_data, "--nproc", "2", "--out",
                              tmp_path / "run"], capsys)
    assert_one_line_error(code, out, err, "not a regular file", "each rank of --nproc reads it again")
    assert not (tmp_path / "run").exists()


def test_train_arch_with_a_deeply_nested_spec_file_is_one_line(tmp_path, capsys, good_data):
    """`--arch X --spec FILE` parsed the file with only ValueError caught: JSON nested deeper than
    Python's recursion limit was a RecursionError traceback (without --arch it was one line)."""
    deep = tmp_path / "deep.json"
    deep.write_text("[" * 100_000 + "]" * 100_000)
    for arch in (["--arch", "sabour2017"], []):
        code, out, err = run_cli(["train", *arch, "--spec", deep, "--data-dir", good_data, "--epochs", "1",
                                  "--out", tmp_path / "run", "-q"], capsys)
        assert_one_line_error(code, out, err, "--spec", "deep.json", "not valid JSON")
        assert not (tmp_path / "run").exists()


@pytest.mark.parametrize(
    ("command", "args", "words"),
    [
        ("eval", ["--batch-size", "0"], ["--batch-size"]),
        ("eval", ["--limit", "0"], ["--limit"]),
        ("eval", ["--limit", "-5"], ["--limit"]),
        ("eval", ["--dataset", "cifar"], ["dataset", "'cifar'"]),
        ("eval", ["--backend", "jax"], ["unknown backend"]),
        ("eval", ["--data-dir", "/nonexistent/capsctl"], ["--data-dir", "no such folder"]),
        ("eval-pairs", ["--digits", "1"], ["--digits"]),
        ("eval-pairs", ["--digits", "11"], ["--digits"]),
        ("eval-pairs", ["--layout", "diagonal"], ["--layout", "'diagonal'"]),
        ("eval-pairs", ["--seed", "-1"], ["--seed"]),
        ("eval-pairs", ["--limit", "0"], ["--limit"]),
        ("eval-pairs", ["--batch-size", "0"], ["--batch-size"]),
        ("eval-pairs", ["--backend", "jax"], ["unknown backend"]),
        ("eval-pairs", ["--json", "--digits", "x"], ["--digits", "valid integer"]),
    ],
)
def test_eval_options_out_of_range(capsys, good_data, good_model, command, args, words):
    extra = [] if "--data-dir" in args else ["--data-dir", good_data]
    code, out, err = run_cli([command, good_model, *extra, *args], capsys)
    assert_one_line_error(code, out, err, *words)


def test_data_fetch_options(tmp_path, capsys, cache):
    a_file = tmp_path / "a-file"
    a_file.write_text("x")
    for args, words in [
        (["data", "fetch", "cifar", "--from", tmp_path], ["dataset", "'cifar'"]),
        (["data", "fetch", "mnist", "--from", tmp_path / "nowhere"], ["--from", "nowhere"]),
        (["data", "fetch", "mnist", "--from", a_file], ["--from", "a-file"]),
        (["data", "fetch", "mnist", "--from", tmp_path], ["--from", "four IDX files"]),
        (["data", "list", "--data-dir", tmp_path / "nowhere"], ["--data-dir", "nowhere: no such folder"]),
    ]:
        code, out, err = run_cli(args, capsys)
        assert_one_line_error(code, out, err, *words)
        assert not (cache / "capsctl" / "mnist").exists()


# -- backends that are registered but not installed ----------------------------------------------------

def test_backend_module_missing_names_the_extra(capsys, monkeypatch, good_data, good_model, tmp_path):
    from capsctl import backend as backends

    monkeypatch.setitem(backends.BUILTIN, "ghost", "capsctl_ghost_not_installed:GhostBackend")
    monkeypatch.setitem(backends.EXTRAS, "ghost", "capsctl[ghost]")
    for args in (["eval", good_model, "--data-dir", good_data, "--backend", "ghost"],
                 ["train", "--spec", spec_file(tmp_path), "--data-dir", good_data, "--backend", "ghost",
                  "--out", tmp_path / "run"]):
        code, out, err = run_cli(args, capsys)
        assert_one_line_error(code, out, err, "'ghost'", "pip install 'capsctl[ghost]'")
        assert not (tmp_path / "run").exists()


def test_framework_not_installed_names_the_extra(capsys, monkeypatch, good_data, good_model, tmp_path):
    # The torch backend is registered, but torch itself is "not installed": find_spec sees None.
    monkeypatch.setitem(sys.modules, "torch", None)
    for args in (["eval-pairs", good_model, "--data-dir", good_data, "--limit", "4"],
                 ["train", "--spec", spec_file(tmp_path), "--data-dir", good_data,
                  "--out", tmp_path / "run"]):
        code, out, err = run_cli(args, capsys)
        assert_one_line_error(code, out, err, "'torch'", "not installed", "pip install 'capsctl[torch]'")
        assert not (tmp_path / "run").exists()


# -- --debug shows the traceback ---------------------------------------------------------------------

def test_debug_shows_the_traceback_and_keeps_the_exit_code(tmp_path, good_data, capsys):
    # (it re-raised: the interpreter's exit code 1, where a script checks for 2)
    from capsctl.cli import main

    model = tmp_path / "m.safetensors"
    model.write_bytes(b"\x00" * 4)
    with pytest.raises(SystemExit) as info:
        main(["--debug", "eval", str(model), "--data-dir", str(good_data)])
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert "Traceback (most recent call last)" in err and "CapsctlError" in err
    assert err.splitlines()[-1].startswith("error: ") and "damaged safetensors file" in err


def _capsctl(*args, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "capsctl", *map(str, args)], capture_output=True, text=True,
                          cwd=cwd, timeout=120)


def test_subprocess_bad_model_one_line_and_debug_traceback(tmp_path, good_data):
    model = tmp_path / "m.safetensors"
    model.write_bytes(model_bytes()[:300])
    p = _capsctl("eval", model, "--data-dir", good_data, cwd=tmp_path)
    assert_one_line_error(p.returncode, p.stdout, p.stderr, str(model), "damaged safetensors file")
    assert p.stdout == ""
    p = _capsctl("eval", model, "--data-dir", good_data, "--debug", cwd=tmp_path)
    assert p.returncode == 2
    assert "Traceback (most recent call last)" in p.stderr and "CapsctlError" in p.stderr
    assert "damaged safetensors" in p.stderr


def test_subprocess_train_on_broken_data_writes_nothing(tmp_path, arrays):
    data, fname = _damaged_set(tmp_path, arrays, "corrupt gzip", "train")
    spec = spec_file(tmp_path)
    p = _capsctl("train", "--spec", spec, "--data-dir", data, "--epochs", "1",
                 "--out", tmp_path / "runs" / "a", cwd=tmp_path)
    assert_one_line_error(p.returncode, p.stdout, p.stderr, fname, "corrupt gzip")
    assert not (tmp_path / "runs").exists()
    p = _capsctl("train", "--batch-size", "0", "--spec", spec, "--data-dir", data,
                 "--out", tmp_path / "runs" / "b", cwd=tmp_path)
    assert_one_line_error(p.returncode, p.stdout, p.stderr, "--batch-size")
    assert not (tmp_path / "runs").exists()


# -- damaged checkpoints on --resume --------------------------------------------------------------------

@pytest.fixture(scope="module")
def trained_run(tmp_path_factory, good_data):
    """A finished 1-epoch run (torch) whose checkpoint the tests below damage in copies."""
    from capsctl.cli import main

    base = tmp_path_factory.mktemp("run")
    spec = spec_file(base)
    with pytest.raises(SystemExit) as info:
        main(["train", "--spec", str(spec), "--data-dir", str(good_data), "--epochs", "2",
              "--batch-size", "16", "--limit", "32", "--out", str(base / "run"), "-q"])
    assert info.value.code == 0
    return base / "run"


def _checkpoint_cases():
    from capsctl.training.run_folder import load_checkpoint, save_checkpoint  # noqa: F401 (documents what is damaged)

    def optim_slot(ck):
        ck.optimizer["m.trunk.0.kernel"] = ck.optimizer["m.trunk.0.kernel"][..., :1]

    def optim_nan(ck):
        ck.optimizer["v.head.capsule.kernel"] = np.full_like(ck.optimizer["v.head.capsule.kernel"], np.nan)

    def no_step(ck):
        del ck.optimizer["step"]

    def step_past_epoch(ck):
        ck.step = 99

    def float_batch(b):
        def edit(h):
            meta = h["__metadata__"]
            assert '"batch_size": 16,' in meta["config"]
            meta["config"] = meta["config"].replace('"batch_size": 16,', '"batch_size": 16.5,')

        return rewrite_header(b, edit)

    return {
        "truncated": (None, lambda b: b[: len(b) - 100], ["damaged safetensors file"]),
        "optimizer slot of the wrong shape": (optim_slot, None, ["optimizer state m.trunk.0.kernel"]),
        "NaN in the optimizer": (optim_nan, None, ["optimizer state v.head.capsule.kernel"]),
        "no optimizer step": (no_step, None, ["optimizer state 'step'"]),
        "step past the epoch": (step_past_epoch, None, ["step 99", "past the end of an epoch"]),
        "config not JSON": (None, lambda b: rewrite_header(b, lambda h: h["__metadata__"].update(config="{")),
                            ["damaged checkpoint metadata"]),
        "config a JSON list": (None, lambda b: rewrite_header(b, lambda h: h["__metadata__"].update(
            config="[]")), ["damaged checkpoint metadata"]),
        "a model, not a checkpoint": (None, lambda b: model_bytes(), ["format"]),
        # (a float batch size passed the range checks and was a TypeError traceback deep in training)
        "config with a float batch size": (None, float_batch, ["damaged checkpoint metadata",
                                                               "batch_size is 16.5"]),
    }


@pytest.mark.torch
@pytest.mark.parametrize("case", sorted(_checkpoint_cases()))
def test_resume_refuses_a_damaged_checkpoint_and_changes_nothing(tmp_path, capsys, good_data, trained_run,
                                                                  case):
    import shutil
    from dataclasses import replace

    from capsctl.training.run_folder import CHECKPOINT_FILE, load_checkpoint, save_checkpoint

    run = tmp_path / "run"
    shutil.copytree(trained_run, run)
    edit, mutate, words = _checkpoint_cases()[case]
    ck = load_checkpoint(run)
    ck = replace(ck, config=replace(ck.config, epochs=3), optimizer=dict(ck.optimizer))
    if edit is not None:
        edit(ck)
    save_checkpoint(run, ck)
    if mutate is not None:
        (run / CHECKPOINT_FILE).write_bytes(mutate((run / CHECKPOINT_FILE).read_bytes()))
    before = {p.name: p.read_bytes() for p in run.iterdir()}
    code, out, err = run_cli(["train", "--resume", run, "--data-dir", good_data, "-q"], capsys)
    assert_one_line_error(code, out, err, *words)
    assert {p.name: p.read_bytes() for p in run.iterdir()} == before


# -- images (capsctl.data.images.load_image and `capsctl inspect`) ------------------------------------------

def _png_bomb(side: int = 100_000) -> bytes:
    """A valid PNG header claiming side x side 8-bit gray pixels (10 G), with a few bytes of data."""
    return png_bytes(struct.pack(">IIBBBBB", side, side, 8, 0, 0, 0, 0), zlib.compress(b"\0" * 1000))


def _png(tmp_path: Path, name: str, image) -> Path:
    p = tmp_path / name
    image.save(p)
    return p


def _image_cases(tmp_path: Path) -> dict[str, tuple[Path, list[str]]]:
    from PIL import Image

    digit = (np.arange(28 * 28).reshape(28, 28) % 256).astype(np.uint8)
    good = _png(tmp_path, "good.png", Image.fromarray(digit))
    data = good.read_bytes()
    cases = {}
    for name, content in {
        "empty.png": b"",
        "text.png": b"this is not an image\n",
        "truncated.png": data[: len(data) // 2],
        "header-only.png": data[:33],
        "bomb.png": _png_bomb(),
        "big-but-legal-header.png": _png_bomb(5000),
    }.items():
        (tmp_path / name).write_bytes(content)
    words = {"empty.png": ["empty"], "text.png": ["not an image"], "truncated.png": ["truncated or corrupt"],
             "header-only.png": ["image"], "bomb.png": ["refused"],
             "big-but-legal-header.png": ["over the limit"]}
    for name, w in words.items():
        cases[name] = (tmp_path / name, w)
    cases["folder"] = (tmp_path, ["is a folder"])
    cases["absent.png"] = (tmp_path / "absent.png", ["no such file"])
    return cases


def test_images_bad_files_are_refused_by_the_loader(tmp_path):
    import capsctl.data.images as images
    for name, (path, words) in _image_cases(tmp_path).items():
        with pytest.raises(CapsctlError) as info:
            images.load_image(path)
        msg = str(info.value)
        assert "\n" not in msg and str(path) in msg, (name, msg)
        for w in words:
            assert w in msg, (name, msg)


def test_images_odd_but_valid_formats_are_read(tmp_path):
    from PIL import Image

    import capsctl.data.images as images

    ramp = (np.arange(28 * 28).reshape(28, 28) % 200).astype(np.uint8)
    cases = {
        "16bit.png": Image.fromarray(ramp.astype(np.uint16) * 257),
        "palette.png": Image.fromarray(ramp).convert("P"),
        "rgba.png": Image.fromarray(np.dstack([ramp, ramp, ramp, np.full_like(ramp, 255)]), "RGBA"),
        "one-by-one.png": Image.fromarray(np.array([[200]], np.uint8)),
    }
    for name, im in cases.items():
        x = images.load_image(_png(tmp_path, name, im), invert="no")
        assert x.dtype == np.float32 and x.ndim == 2 and np.isfinite(x).all()
        assert x.min() >= 0.0 and x.max() <= 1.0
        if name != "one-by-one.png":
            assert x.shape == (28, 28)
            assert np.allclose(x, ramp / 255.0, atol=2 / 255), name
    spec = ModelSpec.from_dict(TINY)
    with pytest.raises(CapsctlError, match=r"one-by-one\.png.*at least 8"):
        images.load_image(tmp_path / "one-by-one.png", spec=spec)


@pytest.mark.parametrize("case",
                         ["empty.png", "text.png", "truncated.png", "bomb.png", "folder", "absent.png"])
def test_inspect_refuses_bad_images_and_writes_no_figure(tmp_path, capsys, good_model, case):
    path, words = _image_cases(tmp_path)[case]
    fig = tmp_path / "fig.png"
    code, out, err = run_cli(["inspect", path, "--model", good_model, "--out", fig], capsys)
    assert_one_line_error(code, out, err, str(path), *words)
    assert not fig.exists()


def test_inspect_refuses_a_broken_model_and_an_image_too_small(tmp_path, capsys, good_model):
    from PIL import Image

    img = _png(tmp_path, "one.png", Image.fromarray(np.array([[200]], np.uint8)))
    code, out, err = run_cli(["inspect", img, "--model", good_model], capsys)
    assert_one_line_error(code, out, err, "one.png", "at least 8")
    model = tmp_path / "m.safetensors"
    model.write_bytes(model_bytes()[:-7])
    code, out, err = run_cli(["inspect", img, "--model", model], capsys)
    assert_one_line_error(code, out, err, str(model), "damaged safetensors file")



# -- export and import ---------------------------------------------------------------------------------------

@pytest.mark.parametrize(
    ("out_name", "extra", "words"),
    [
        ("m.bin", [], ["--out", "cannot tell the format"]),
        ("m.pt", ["--format", "caffe"], ["--format", "'caffe'"]),
        ("missing/m.pt", [], ["--out", "does not exist"]),
        (".", [], ["--out", "is a folder"]),
        ("SELF", [], ["--out", "is the input file"]),
    ],
)
def test_export_refuses_bad_options_and_writes_nothing(tmp_path, capsys, good_model, out_name, extra, words):
    model = tmp_path / "model.safetensors"
    model.write_bytes(good_model.read_bytes())
    target = model if out_name == "SELF" else tmp_path / out_name
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir() if p.is_file()}
    code, out, err = run_cli(["export", model, "--out", target, *extra], capsys)
    assert_one_line_error(code, out, err, *words)
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir() if p.is_file()} == before


@pytest.mark.parametrize(
    "case", ["truncated", "NaN weights", "header length past the end", "spec does not match tensors"]
)
@pytest.mark.parametrize("suffix", [".pt", ".keras", ".onnx"])
def test_export_refuses_broken_models_and_writes_nothing(tmp_path, capsys, case, suffix):
    mutate, words = WEIGHT_CASES[case]
    model = tmp_path / "model.safetensors"
    model.write_bytes(mutate(model_bytes()))
    code, out, err = run_cli(["export", model, "--out", tmp_path / f"exported{suffix}"], capsys)
    assert_one_line_error(code, out, err, str(model), *words)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.safetensors"]


@pytest.fixture(scope="module")
def torch_export(tmp_path_factory, good_model) -> Path:
    from capsctl.cli import main

    out = tmp_path_factory.mktemp("export") / "tiny.pt"
    with pytest.raises(SystemExit) as info:
        main(["export", str(good_model), "--out", str(out)])
    assert info.value.code == 0
    return out


def _import_cases(tmp_path: Path, torch_export: Path) -> dict[str, tuple[Path, list[str], list[str]]]:
    import io
    import zipfile

    import torch

    data = torch_export.read_bytes()
    cases: dict[str, tuple[bytes, list[str], list[str]]] = {
        "truncated export": (data[: len(data) // 2], [], ["damaged or truncated"]),
        "random bytes": (bytes(range(256)) * 4, [], ["not a torch state_dict file or a .keras archive"]),
        "a safetensors model": (model_bytes(), [], ["already the canonical format"]),
        "empty file": (b"", [], ["not a torch state_dict file"]),
        "truncated zip": (b"PK\x03\x04" + b"\0" * 40, [], ["damaged or truncated archive"]),
        "onnx asked for": (data, ["--format", "onnx"], ["--format", "ONNX"]),
    }
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        zf.writestr("readme.txt", "hello")
    cases["a zip of something else"] = (buf.getvalue(), [], ["neither a torch state_dict"])
    buf = io.BytesIO()
    torch.save({"weight": torch.zeros(3)}, buf)
    cases["a foreign state_dict"] = (buf.getvalue(), [], ["not a capsctl torch export"])
    out = {}
    for name, (content, extra, words) in cases.items():
        p = tmp_path / f"{name.replace(' ', '-')}.pt"
        p.write_bytes(content)
        out[name] = (p, extra, words)
    return out


@pytest.mark.torch
@pytest.mark.parametrize("case", ["truncated export", "random bytes", "a safetensors model", "empty file",
                                  "truncated zip", "onnx asked for", "a zip of something else",
                                  "a foreign state_dict"])
def test_import_refuses_what_is_not_an_intact_export_and_writes_nothing(tmp_path, capsys, torch_export, case):
    path, extra, words = _import_cases(tmp_path, torch_export)[case]
    target = tmp_path / "out" / "imported.safetensors"
    target.parent.mkdir()
    code, out, err = run_cli(["import", path, "--out", target, *extra], capsys)
    assert_one_line_error(code, out, err, *words)
    if "--format" not in extra:
        assert str(path) in err
    assert list(target.parent.iterdir()) == []


def test_import_missing_file(tmp_path, capsys):
    code, out, err = run_cli(["import", tmp_path / "absent.pt", "--out", tmp_path / "m.safetensors"], capsys)
    assert_one_line_error(code, out, err, "absent.pt", "no such file")
    assert list(tmp_path.iterdir()) == []


# -- paths that cannot be used, and damaged result files --------------------------------------------------


def test_a_symbolic_link_loop_is_one_line_not_a_runtime_error(tmp_path):
    from capsctl.cli._export import _check_out
    from capsctl.data import _folder_cache

    loop = tmp_path / "loop.pt"
    loop.symlink_to(loop)  # resolving it raises RuntimeError on Python 3.10-3.12 (3.13 returns the path)
    for call, words in ((lambda: _check_out(loop, tmp_path / "m.safetensors"), "--out .*symbolic links"),
                        (lambda: _folder_cache.forget(str(loop)), "data forget .*symbolic links")):
        if sys.version_info >= (3, 13):
            with contextlib.suppress(CapsctlError):  # (anything else fails the test)
                call()
        else:
            with pytest.raises(CapsctlError, match=words):
                call()


def test_a_link_loop_inside_a_class_folder_is_walked_once(tmp_path):
    from capsctl.data.folders import _list

    cls = tmp_path / "train" / "0"
    cls.mkdir(parents=True)
    (cls / "a.png").write_bytes(b"x")
    (cls / "loop").symlink_to(cls, target_is_directory=True)  # followed, it would list a.png forever deep
    (cls / "sub").mkdir()
    (cls / "sub" / "b.png").write_bytes(b"x")
    files, skipped = _list(tmp_path / "train", ["0"], "train")
    assert sorted(f.rel for f in files) == ["a.png", "sub/b.png"] and skipped == 0


def test_a_very_long_file_name_is_written_atomically(tmp_path):
    from capsctl._io import atomic_write_bytes

    path = tmp_path / ("m" * 250 + ".png")  # a legal name; `.NAME.tmp-PID` beside it would not be
    atomic_write_bytes(path, b"data")
    assert path.read_bytes() == b"data" and [p.name for p in tmp_path.iterdir()] == [path.name]


def test_pillows_decompression_bomb_warning_is_not_printed(tmp_path):
    import warnings

    from capsctl.data.folders import _open

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    ihdr = struct.pack(">IIBBBBB", 10_000, 10_000, 8, 0, 0, 0, 0)  # 10^8 pixels: over Pillow's warning
    path = tmp_path / "big.png"
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", b"") + chunk(b"IEND", b""))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a warning that escaped would fail here
        with _open(path) as im:
            assert im.size == (10_000, 10_000)  # (the loader then refuses it by its size)


def _results(folder: Path, data: bytes) -> Path:
    folder.mkdir()
    (folder / "results.json").write_bytes(data)
    return folder


@pytest.mark.parametrize(
    ("data", "words"),
    [
        (b'{"format": "capsctl-results/1", "kind": "pairs", "x": "\xff"}', ["results.json", "unreadable"]),
        (b'{"format": "capsctl-results/1"}', ["results.json", "kind"]),
        (b'{"format": "capsctl-results/1", "kind": "pairs"}', ["res/results.json", "KeyError"]),
        (b'{"format": "capsctl-results/1", "kind": "pairs", "models": {"a": 1}}',
         ["res/results.json", "damaged"]),
        (b'{"format": "capsctl-results/1", "kind": "ablate", "tests": "test"}',
         ["res/results.json", "damaged"]),
    ],
    ids=["not UTF-8", "no kind", "fields missing", "models not a list", "ablate damaged"],
)
def test_report_refuses_a_damaged_results_file_and_leaves_nothing(tmp_path, capsys, data, words):
    folder = _results(tmp_path / "res", data)
    out_doc = tmp_path / "new" / "deeper" / "R.md"
    code, out, err = run_cli(["experiment", "report", folder, "--out", out_doc], capsys)
    assert_one_line_error(code, out, err, *words)
    assert not (tmp_path / "new").exists()


def test_report_made_from_real_results_checks_every_field_first(tmp_path, capsys):
    # a real results.json with one field garbled (a string where a number goes): named with its file
    source = Path(__file__).parents[1] / "docs" / "results" / "mnist5k-torch-default" / "results.json"
    real = json.loads(source.read_text())
    real["models"][0]["tests"]["test"]["accuracy"] = "x"
    folder = _results(tmp_path / "res", json.dumps(real).encode())
    code, out, err = run_cli(["experiment", "report", folder, "--out", tmp_path / "new" / "R.md"], capsys)
    assert_one_line_error(code, out, err, "res/results.json", "damaged results file")
    assert not (tmp_path / "new").exists()


@pytest.mark.parametrize(("error", "code"), [
    (FileExistsError(17, "File exists", "x"), 2), (OSError(40, "Too many levels of symbolic links", "x"), 2),
    (OSError(36, "File name too long", "x"), 2), (OSError(30, "Read-only file system", "x"), 2),
    (OSError(28, "No space left on device", "x"), 1),  # the machine, not the input
])
def test_os_errors_on_a_users_path_are_bad_input_and_a_full_disk_is_not(tmp_path, capsys, monkeypatch,
                                                                         error, code):
    from capsctl.experiment import report

    def fail(*args, **kwargs):
        raise error

    monkeypatch.setattr(report, "write_report", fail)
    got, _, err = run_cli(["experiment", "report", tmp_path, "--out", tmp_path / "R.md"], capsys)
    assert got == code and err.startswith("error: x: ") and err.count("\n") == 1, err


def test_report_into_a_path_that_cannot_be_a_folder_or_a_text_file_is_bad_input(tmp_path, capsys):
    real = Path(__file__).parents[1] / "docs" / "results" / "mnist5k-torch-default" / "results.json"
    folder = _results(tmp_path / "res", real.read_bytes())
    (tmp_path / "afile").write_text("x")
    code, out, err = run_cli(["experiment", "report", folder, "--out", tmp_path / "afile" / "R.md"], capsys)
    assert_one_line_error(code, out, err, "afile")  # (NotADirectoryError: its parent is a file)
    doc = tmp_path / "R.md"
    doc.write_bytes(b"# Results\n\xff\n")
    code, out, err = run_cli(["experiment", "report", folder, "--out", doc, "--section", "S"], capsys)
    assert_one_line_error(code, out, err, "--out", "not a UTF-8 text file")
    assert doc.read_bytes() == b"# Results\n\xff\n"
    code, out, err = run_cli(["experiment", "report", folder, "--out", doc], capsys)  # whole: refused too
    assert_one_line_error(code, out, err, "--out", "not a UTF-8 text file")
    # a file capsctl did not write is not replaced whole (a README.md given as --out was lost); a section
    # may be added to it
    readme = tmp_path / "README.md"
    readme.write_text("# My project\n\nNotes.\n")
    code, out, err = run_cli(["experiment", "report", folder, "--out", readme], capsys)
    assert_one_line_error(code, out, err, "not a report capsctl wrote", "--section")
    assert readme.read_text() == "# My project\n\nNotes.\n"
    code, out, err = run_cli(["experiment", "report", folder, "--out", readme, "--section", "S"], capsys)
    assert code == 0, err
    text = readme.read_text()
    assert text.startswith("# My project\n") and "capsctl report section: S" in text


def test_a_full_report_rewrite_keeps_complete_sections_past_an_unfinished_one(tmp_path):
    from capsctl.experiment.report import _generated_sections, _section_marks

    (a, _), (b, b_end) = _section_marks("A"), _section_marks("B")
    text = "# Results\n" + a + "A's start, its end mark deleted by hand\n" + b + "kept\n" + b_end
    assert _generated_sections(text) == [("B", b + "kept\n" + b_end)]


def test_report_names_the_damaged_file_of_several_and_refuses_two_folders_of_one_name(tmp_path, capsys):
    """A field only the report's prose reads (the machine) was null: "a results file is damaged inside",
    which of them unsaid. Two folders of one name shared results/<name>: the second's plots under both."""
    source = Path(__file__).parents[1] / "docs" / "results" / "mnist5k-torch-default" / "results.json"
    good = _results(tmp_path / "good", source.read_bytes())
    real = json.loads(source.read_text())
    real["machine"] = None
    bad = _results(tmp_path / "bad", json.dumps(real).encode())
    code, out, err = run_cli(["experiment", "report", good, bad, "--out", tmp_path / "new" / "R.md"], capsys)
    assert_one_line_error(code, out, err, f"report: {bad / 'results.json'} is damaged inside")
    assert not (tmp_path / "new").exists()
    (tmp_path / "other").mkdir()
    twin = _results(tmp_path / "other" / "good", source.read_bytes())
    code, out, err = run_cli(["experiment", "report", good, twin, "--out", tmp_path / "new" / "R.md"], capsys)
    assert_one_line_error(code, out, err, "are both named 'good'", "rename one")
    assert not (tmp_path / "new").exists()


def test_a_spec_too_big_for_any_machine_is_refused_before_anything_is_allocated(tmp_path, capsys, good_data):
    """Each spec field was bounded but not their product: 42 billion parameters failed in init_weights as
    "out of memory (try a smaller --batch-size or --limit)", exit 1."""
    from capsctl.model.weights import MAX_PARAMETERS, parameter_count

    huge = {"trunk": [{"type": "conv", "filters": 4096, "kernel": 3}], "head": "capsule",
            "capsule": {"dim": 1024}, "num_classes": 1000}
    from capsctl.model.spec import ModelSpec

    assert parameter_count(ModelSpec.from_dict(huge)) > MAX_PARAMETERS
    spec = spec_file(tmp_path, huge)
    code, out, err = run_cli(["train", "--spec", spec, "--data-dir", good_data, "--epochs", "1", "--out",
                              tmp_path / "run", "-q"], capsys)
    assert_one_line_error(code, out, err, "model spec:", "trained parameters", "over the limit")
    assert not (tmp_path / "run").exists()


@pytest.mark.torch
def test_eval_pairs_digits_that_make_every_composite_right_or_none_possible(tmp_path, capsys):
    """--digits equal to the model's class count scored 100% for any model (its top k is every class); more
    digits than the scored images hold classes said only "no composites to score"."""
    from capsctl.model.spec import ModelSpec
    from capsctl.model.weights import init_weights, save_model

    for classes in (3, 10):
        spec = ModelSpec.from_dict({**TINY, "num_classes": classes})
        model = tmp_path / f"m{classes}.safetensors"
        save_model(model, spec, init_weights(spec, 0))
        code, out, err = run_cli(["eval-pairs", model, "--digits", str(classes)], capsys)
        assert_one_line_error(code, out, err, f"--digits {classes}", "every composite would count as right",
                              f"2..{classes - 1}")
    rng = np.random.default_rng(0)
    three = tmp_path / "three.npz"
    np.savez(three, x_train=rng.integers(0, 255, (6, 28, 28), np.uint8), y_train=np.array([0, 1, 2] * 2),
             x_test=rng.integers(0, 255, (6, 28, 28), np.uint8), y_test=np.array([0, 1, 2] * 2))
    args = ["eval-pairs", tmp_path / "m10.safetensors", "--dataset", three, "--digits", "4"]
    code, out, err = run_cli(args, capsys)
    assert_one_line_error(code, out, err, "--digits 4", "hold 3 classes", "needs 4 different ones")


@pytest.mark.torch
def test_classes_matched_by_position_are_said_so(tmp_path, capsys):
    """A model with class names scored on numbered data (or the reverse) was matched by position without a
    word: Fashion-MNIST's names on digits scored 100% 'T-shirt/top'; a folder zero..nine sorted 'eight'
    first. The scores stand (that is the documented fallback); the mapping is now printed."""
    from capsctl.model.spec import ModelSpec
    from capsctl.model.weights import init_weights, save_model

    names = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag",
             "Boot"]
    spec = ModelSpec.from_dict({**TINY, "num_classes": 10, "class_names": names})
    save_model(tmp_path / "named.safetensors", spec, init_weights(spec, 0))
    code, _, err = run_cli(["eval", tmp_path / "named.safetensors", "--eval-limit", "20", "--json"], capsys)
    assert code == 0, err
    assert "matched by position" in " ".join(err.split()) and "0 = T-shirt/top, 1 = Trouser" in err
    (tmp_path / "plain.safetensors").write_bytes(model_bytes())
    code, _, err = run_cli(["eval", tmp_path / "plain.safetensors", "--eval-limit", "20", "--json"], capsys)
    assert code == 0 and "matched by position" not in err  # (numbered data, unnamed model: nothing to say)
