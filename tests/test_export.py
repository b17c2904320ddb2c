"""`capsctl export` / `capsctl import`: native torch, Keras and ONNX files, round trips to the
canonical file bit for bit, and refusal (one line, exit 2, nothing written) of every bad file."""

from __future__ import annotations

import json
import zipfile
from pathlib import Path

import numpy as np
import pytest

from capsctl.model import reference
from capsctl.model.presets import for_images, preset
from capsctl.model.spec import DecoderSpec, ModelSpec
from capsctl.model.weights import load_model, save_model

from ._helpers import assert_one_line_error, on_canvas, routing_weights, run_cli

SPECS = {
    "capsule": ModelSpec(),
    "pool": ModelSpec(head="pool"),
    "non-shared": ModelSpec().with_capsule(shared=False, num_inputs=64, routing="sabour", squash="sabour"),
    # the Sabour et al. 2017 preset (8.2M parameters: strided primary capsules, decoder), as trained at 28x28
    "sabour2017": preset("sabour2017").with_capsule(num_inputs=1152).replace(
        decoder=DecoderSpec(hidden=(512, 1024), image_shape=(28, 28, 1))
    ),
    # Efficient-CapsNet: batch norms (running statistics in the file), depthwise primary capsules, attention
    "efficient": preset("efficient").with_capsule(num_inputs=16),
    # its MultiMNIST graph, made for 36x36 composites (16 primary capsules there)
    "efficient-multimnist": preset("efficient-multimnist").with_capsule(num_inputs=16),
    # Efficient-CapsNet trained on 32x40 images: the file records the size (no square one gives its grid)
    "efficient-32x40": for_images("efficient", 32, 40),
}
SIZES = {"efficient-multimnist": (36, 36), "efficient-32x40": (32, 40)}  # where not 28x28 digits


def _digits(mnist, name: str) -> np.ndarray:
    """Three test digits, centred on the model's image size."""
    return on_canvas(mnist.test().images[:3], SIZES.get(name, (28, 28)))


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("models")
    out = {}
    for name, spec in SPECS.items():
        out[name] = d / f"{name}.safetensors"
        save_model(out[name], spec, routing_weights(spec, seed=2))
    return out


def _ok(args, capsys) -> str:
    code, out, err = run_cli(args, capsys)
    assert code == 0, err
    return out


def _refused(args, capsys, *words: str) -> str:
    code, out, err = run_cli(args, capsys)
    assert_one_line_error(code, out, err, *words)
    return err


def _same_model(a: Path, b: Path) -> None:
    sa, wa = load_model(a)
    sb, wb = load_model(b)
    assert sa == sb
    assert sorted(wa) == sorted(wb)
    for k in wa:
        assert wa[k].dtype == wb[k].dtype and wa[k].shape == wb[k].shape, k
        assert wa[k].tobytes() == wb[k].tobytes(), k


# -- native round trips --------------------------------------------------------------------

@pytest.mark.torch
@pytest.mark.parametrize("name", list(SPECS))
def test_torch_export_is_a_plain_state_dict_and_round_trips(tmp_path, capsys, models, mnist, name):
    import torch
    from capsctl_torch._layers import CapsNet

    native = tmp_path / "m.pt"
    _ok(["export", models[name], "--format", "torch", "--out", native], capsys)
    state = torch.load(native, weights_only=True)  # no code is unpickled
    spec, weights = load_model(models[name])
    net = CapsNet(spec)
    net.load_state_dict(state, strict=True)
    assert ModelSpec.from_json(state._metadata[""]["capsctl_spec"]) == spec
    x = _digits(mnist, name)
    with torch.no_grad():
        got = net.eval()(torch.from_numpy(x).permute(0, 3, 1, 2)).numpy()
    np.testing.assert_allclose(got, reference.forward(spec, weights, x)[0], atol=1e-4)
    import capsctl_torch

    plain = capsctl_torch.load_model(str(native))  # the export's --help names it
    with torch.no_grad():
        np.testing.assert_allclose(plain(torch.from_numpy(x).permute(0, 3, 1, 2)).numpy(), got, atol=1e-6)
    back = tmp_path / "back.safetensors"
    _ok(["import", native, "--out", back], capsys)
    _same_model(models[name], back)


@pytest.mark.keras
@pytest.mark.parametrize("name", list(SPECS))
def test_keras_export_loads_in_plain_keras_and_round_trips(tmp_path, capsys, models, mnist, name):
    import capsctl_keras

    native = tmp_path / "m.keras"
    _ok(["export", models[name], "--out", native], capsys)  # format from the suffix
    model = capsctl_keras.load_model(str(native))  # keras.saving.load_model, safe_mode=True
    spec, weights = load_model(models[name])
    x = _digits(mnist, name)
    out = model(x)
    scores = out[0] if isinstance(out, (list, tuple)) else out  # a decoder model also reconstructs
    np.testing.assert_allclose(np.asarray(scores), reference.forward(spec, weights, x)[0], atol=1e-4)
    back = tmp_path / "back.safetensors"
    _ok(["import", native, "--out", back], capsys)
    _same_model(models[name], back)


# -- ONNX ------------------------------------------------------------------------------------

@pytest.mark.torch
@pytest.mark.parametrize(
    ("name", "sizes"),
    [("capsule", [(28, 28), (56, 28), (40, 33)]), ("pool", [(28, 28), (28, 56)]),
     ("non-shared", [(28, 28)]), ("sabour2017", [(28, 28)]), ("efficient", [(28, 28)]),
     ("efficient-multimnist", [(36, 36)]), ("efficient-32x40", [(32, 40)])],
)
def test_onnx_runs_in_onnxruntime_and_matches(tmp_path, capsys, models, mnist, name, sizes):
    import onnx
    import onnxruntime as ort

    from capsctl.backend import get_backend

    path = tmp_path / "m.onnx"
    _ok(["export", models[name], "--format", "onnx", "--out", path], capsys)
    proto = onnx.load(path)
    dims = [d.dim_param or d.dim_value for d in proto.graph.input[0].type.tensor_type.shape.dim]
    assert isinstance(dims[0], str) and dims[3] == 1  # dynamic batch, channels-last input
    assert all(isinstance(d, str) for d in dims[1:3]) == (name in ("capsule", "pool"))
    meta = {p.key: p.value for p in proto.metadata_props}
    spec, weights = load_model(models[name])
    assert ModelSpec.from_json(meta["capsctl_spec"]) == spec
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    runner = get_backend("torch").runner(spec, weights)
    images = mnist.test().images
    for i, (h, w) in enumerate(sizes):
        x = np.zeros((3 + i, h, w, 1), np.float32)
        x[:, :28, :28] = images[: 3 + i]
        x[:, h - 28 :, w - 28 :] = np.maximum(x[:, h - 28 :, w - 28 :], images[10 : 13 + i])
        (got,) = session.run(["scores"], {"images": x})
        np.testing.assert_allclose(got, runner.scores(x), atol=1e-4, err_msg=f"{h}x{w}")
        np.testing.assert_allclose(got[:2], reference.forward(spec, weights, x[:2])[0], atol=1e-4)


# -- bad files and options ---------------------------------------------------------------------

@pytest.fixture(scope="module")
def natives(tmp_path_factory, models) -> dict[str, Path]:
    """Good native files of the capsule model, to damage in the tests."""
    from capsctl_keras import KerasBackend
    from capsctl_torch import TorchBackend

    d = tmp_path_factory.mktemp("natives")
    spec, weights = load_model(models["capsule"])
    (d / "m.pt").write_bytes(TorchBackend().export_bytes(spec, weights, "torch"))
    (d / "m.keras").write_bytes(KerasBackend().export_bytes(spec, weights, "keras"))
    return {"torch": d / "m.pt", "keras": d / "m.keras"}


def _rewrite_zip(src: Path, dst: Path, member: str, change) -> None:
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, "w") as zout:
        for item in zin.namelist():
            data = zin.read(item)
            zout.writestr(item, change(data) if item == member else data)


def _torch_with(state_change, natives, dst: Path) -> Path:
    import torch

    state = torch.load(natives["torch"], weights_only=True)
    state_change(state)
    torch.save(state, dst)
    return dst


def _edit_spec(state, change) -> None:
    """Change the spec a torch export carries in its state_dict's metadata."""
    state._metadata[""]["capsctl_spec"] = change(state._metadata[""]["capsctl_spec"])


def _shrunk_spec(text: str) -> str:
    d = json.loads(text)
    d["trunk"][0]["filters"] = 32
    return json.dumps(d)


@pytest.mark.torch
@pytest.mark.keras
@pytest.mark.parametrize(
    ("case", "words"),
    [
        ("torch-unrelated", ["not a capsctl torch export"]),
        ("torch-truncated", ["truncated"]),
        ("torch-truncated-forced", ["truncated"]),  # (damaged whatever --format says)
        ("torch-code-pickle", ["not a readable torch state_dict"]),
        ("torch-spec-mismatch", ["trunk.convs.0.weight", "shape"]),
        ("torch-extra-tensor", ["'extra'", "not part of"]),
        ("torch-missing-tensor", ["'head.kernel'", "missing"]),
        ("torch-bad-spec", ["capsule.routing"]),
        ("torch-newer-format", ["format is 'capsctl/2', but this capsctl reads 'capsctl/1'"]),
        ("keras-unrelated", ["not a capsctl Keras model", "Sequential"]),
        ("keras-truncated", ["truncated"]),
        ("keras-truncated-forced", ["truncated"]),
        ("keras-spec-mismatch", ["weights", "shape"]),
        ("keras-no-weights", ["not a Keras model archive"]),
        ("keras-newer-format", ["format is 'capsctl/2', but this capsctl reads 'capsctl/1'"]),
        ("safetensors", ["already the canonical format"]),
        ("onnx", ["ONNX"]),
        ("text", ["not a torch state_dict file or a .keras archive"]),
        ("folder", ["is a folder"]),
        ("missing", ["no such file"]),
    ],
)
def test_import_refuses_bad_files(tmp_path, capsys, models, natives, case, words):
    import torch

    bad = tmp_path / "bad"
    args: list = []
    if case == "torch-unrelated":
        torch.save(torch.nn.Linear(3, 4).state_dict(), bad)
    elif case.startswith(("torch-truncated", "keras-truncated")):
        data = natives[case.split("-")[0]].read_bytes()
        bad.write_bytes(data[: len(data) // 2])
        if case.endswith("forced"):
            args = ["--format", case.split("-")[0]]
    elif case == "torch-code-pickle":
        torch.save({"x": Path("/etc")}, bad)  # a global weights_only refuses to rebuild
    elif case == "torch-spec-mismatch":
        _torch_with(lambda s: _edit_spec(s, _shrunk_spec), natives, bad)
    elif case == "torch-extra-tensor":
        _torch_with(lambda s: s.update(extra=torch.zeros(2)), natives, bad)
    elif case == "torch-missing-tensor":
        _torch_with(lambda s: s.pop("head.kernel"), natives, bad)
    elif case == "torch-bad-spec":
        _torch_with(lambda s: _edit_spec(s, lambda text: text.replace('"su"', '"x"', 1)), natives, bad)
    elif case == "torch-newer-format":
        _torch_with(lambda s: s._metadata[""].update(capsctl_format="capsctl/2"), natives, bad)
    elif case == "keras-newer-format":
        def newer(data: bytes) -> bytes:
            c = json.loads(data)
            c["config"]["format"] = "capsctl/2"  # (as a later capsctl may write it)
            return json.dumps(c).encode()

        _rewrite_zip(natives["keras"], bad, "config.json", newer)
    elif case == "keras-unrelated":
        import capsctl_keras._env  # noqa: F401  (pins tensorflow)
        import keras

        keras.Sequential([keras.Input((4,)), keras.layers.Dense(2)]).save(tmp_path / "other.keras")
        bad = tmp_path / "other.keras"
    elif case == "keras-spec-mismatch":
        def change(data: bytes) -> bytes:
            c = json.loads(data)
            c["config"]["spec"]["trunk"][0]["filters"] = 32
            return json.dumps(c).encode()

        _rewrite_zip(natives["keras"], bad, "config.json", change)
    elif case == "keras-no-weights":
        with zipfile.ZipFile(natives["keras"]) as zin, zipfile.ZipFile(bad, "w") as zout:
            zout.writestr("config.json", zin.read("config.json"))
        args = ["--format", "keras"]
    elif case == "safetensors":
        bad = models["capsule"]
    elif case == "onnx":
        bad = tmp_path / "m.onnx"
        bad.write_bytes(b"\x08\x07\x12\x07pytorch")  # the start of an ONNX protobuf
    elif case == "text":
        bad.write_text("hello\n")
    elif case == "folder":
        bad = tmp_path
    out = tmp_path / "out.safetensors"
    src = bad if case != "missing" else tmp_path / "nope.pt"
    _refused(["import", src, "--out", out, *args], capsys, *words)
    assert not out.exists()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no temp left behind


@pytest.mark.parametrize(
    ("args", "words"),
    [
        (["--format", "tflite", "--out", "{d}/m.tflite"], ["--format", "'tflite' is not one of"]),
        (["--out", "{d}/m.bin"], ["cannot tell the format"]),
        (["--format", "keras", "--out", "{d}/m.h5"], [".keras"]),
        (["--format", "onnx", "--out", "{d}/m.pt"], ["a .pt file is a torch export", "call it m.onnx"]),
        (["--out", "{d}/missing/m.pt"], ["does not exist"]),
        (["--out", "{model}"], ["is the input file"]),
    ],
)
def test_export_refuses_bad_options(tmp_path, capsys, models, args, words):
    args = [a.format(d=tmp_path, model=models["capsule"]) for a in args]
    _refused(["export", models["capsule"], *args], capsys, *words)
    assert sorted(p.name for p in tmp_path.iterdir()) == []


def test_export_refuses_a_broken_model(tmp_path, capsys, models):
    broken = tmp_path / "broken.safetensors"
    data = models["pool"].read_bytes()
    broken.write_bytes(data[: len(data) - 100])
    _refused(["export", broken, "--out", tmp_path / "m.pt"], capsys, "damaged safetensors file")
    assert not (tmp_path / "m.pt").exists()


def test_import_onnx_format_is_refused_by_name(tmp_path, capsys, models):
    _refused(["import", models["capsule"], "--format", "onnx", "--out", tmp_path / "x.safetensors"], capsys,
             "ONNX")


def test_import_refuses_a_format_the_file_is_not_and_an_export_suffix_as_out(tmp_path, capsys, natives):
    """`import x.keras --format torch` leaked torch's "[enforce fail at inline_container.cc…]"; `--out x.pt`
    wrote a safetensors file under a torch export's name."""
    out = tmp_path / "out.safetensors"
    _refused(["import", natives["keras"], "--format", "torch", "--out", out], capsys,
             "a keras export, not torch", "leave out --format")
    _refused(["import", natives["torch"], "--format", "keras", "--out", out], capsys,
             "a torch export, not keras")
    for name in ("x.pt", "x.keras", "x.onnx"):
        _refused(["import", natives["torch"], "--out", tmp_path / name], capsys,
                 f"--out {tmp_path / name}: import writes the canonical model file", "call it x.safetensors")
    assert sorted(p.name for p in tmp_path.iterdir()) == []
    _ok(["import", natives["keras"], "--format", "keras", "--out", out], capsys)  # the right one, given


@pytest.mark.torch
def test_onnx_export_on_an_old_torch_or_an_exporter_failure_is_one_line(tmp_path, capsys, models,
                                                                        monkeypatch):
    """pyproject allowed torch 2.2, whose exporter has no dynamo=True with dynamic shapes (a TypeError
    traceback); any exporter error was a traceback, exit 1."""
    import torch

    monkeypatch.setattr(torch, "__version__", "2.4.1+cpu")
    _refused(["export", models["capsule"], "--out", tmp_path / "m.onnx"], capsys,
             "--format onnx needs torch 2.5 or newer (this is 2.4.1+cpu)", "pip install 'torch>=2.5'")
    monkeypatch.setattr(torch, "__version__", "2.13.0+cpu")

    def refuse(*a, **k):
        raise RuntimeError("Failed to export the model with torch.export.\nmore lines")

    monkeypatch.setattr(torch.onnx, "export", refuse)
    _refused(["export", models["capsule"], "--out", tmp_path / "m.onnx"], capsys,
             "could not export this model to ONNX (Failed to export the model with torch.export.)")
    assert not (tmp_path / "m.onnx").exists()


def test_export_and_import_keep_off_the_canonical_and_checkpoint_files(tmp_path, capsys, models, natives):
    """`export --format torch --out x.safetensors` wrote a torch zip under the canonical name; `import
    --out runs/r/checkpoint.safetensors` replaced a run's checkpoint; `import m.onnx --format torch` said
    "holds Python objects" instead of why."""
    for fmt in ("torch", "onnx"):
        _refused(["export", models["capsule"], "--format", fmt, "--out", tmp_path / "m.safetensors"], capsys,
                 "a .safetensors file is the canonical model", "export writes .pt, .keras or .onnx")
    ck = tmp_path / "checkpoint.safetensors"
    _refused(["import", natives["torch"], "--out", ck], capsys, "is a run's checkpoint")
    assert sorted(p.name for p in tmp_path.iterdir()) == []
    graph = tmp_path / "m.onnx"
    graph.write_bytes(b"\x08\x07 not really")
    _refused(["import", graph, "--format", "torch", "--out", tmp_path / "x.safetensors"], capsys,
             "ONNX graphs cannot be imported")
    _refused(["import", models["capsule"], "--format", "keras", "--out", tmp_path / "x.safetensors"], capsys,
             "already the canonical format")
    # (keras.saving.load_model opens only a lower-case .keras)
    _refused(["export", models["capsule"], "--out", tmp_path / "M.KERAS"], capsys,
             "must end in .keras (lower case)")


@pytest.mark.keras
def test_a_keras_config_of_channels_first_float16_leaves_the_model_alone(tmp_path, capsys, models, mnist):
    """The layers, the optimiser and a traced step read keras.json's image_data_format, floatx and dtype
    policy: under `channels_first` export was a traceback, under `float16` every exported weight was
    rounded (import then wrote other tensors, silently) and training rounded its learning rate."""
    import capsctl_keras
    import keras

    from capsctl.backend import OptimConfig, get_backend

    native = tmp_path / "m.keras"
    _ok(["export", models["efficient"], "--out", native], capsys)
    spec, weights = load_model(models["efficient"])
    x = _digits(mnist, "efficient")
    y = np.eye(10, dtype=np.float32)[[7, 2, 1]]
    reference_step = get_backend("keras").trainer(spec, weights, OptimConfig())
    reference_step.step(x, y, 3e-3)

    def odd() -> None:
        keras.config.set_image_data_format("channels_first")
        keras.config.set_floatx("float16")
        keras.config.set_dtype_policy("float16")

    before = keras.config.image_data_format(), keras.config.floatx(), keras.config.dtype_policy()
    try:
        odd()  # a user's program: load_model builds in float32, channels-last, and leaves their settings
        model = capsctl_keras.load_model(str(native))
        assert {w.dtype for w in model.weights} == {"float32"}
        np.testing.assert_allclose(np.asarray(model(x)), reference.forward(spec, weights, x)[0], atol=1e-4)
        assert (keras.config.image_data_format(), keras.config.floatx()) == ("channels_first", "float16")
        # capsctl's commands: export, import and a training step as under Keras' defaults
        _ok(["export", models["efficient"], "--out", tmp_path / "again.keras"], capsys)
        odd()
        _ok(["import", tmp_path / "again.keras", "--out", tmp_path / "back.safetensors"], capsys)
        _same_model(models["efficient"], tmp_path / "back.safetensors")
        odd()
        trainer = get_backend("keras").trainer(spec, weights, OptimConfig())
        trainer.step(x, y, 3e-3)
        got, want = trainer.weights(), reference_step.weights()
        assert all(got[k].dtype == np.float32 and np.array_equal(got[k], want[k]) for k in want)
    finally:
        keras.config.set_image_data_format(before[0])
        keras.config.set_floatx(before[1])
        keras.config.set_dtype_policy(before[2])
