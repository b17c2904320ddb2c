"""`--dataset PATH`: the user's own data (an ImageFolder layout, an .npz, a folder of IDX files), the model
following it (channels, classes, class names), RGB end to end, and every problem as one line."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from capsctl.data import datasets
from capsctl.data.folders import load_image_folder
from capsctl.data.npz import load_npz
from capsctl.errors import CapsctlError
from capsctl.model import reference
from capsctl.model.spec import ModelSpec
from capsctl.model.weights import init_weights, load_model, save_model

from ._helpers import BACKENDS, TINY, assert_one_line_error, run_cli, write_set

CLASSES = ("cat", "dog", "eel")


def _folder(root: Path, n: int = 4, size: tuple[int, int] = (20, 20), rgb: bool = True) -> Path:
    """root/train/<class>/*.png and root/test/<class>/*.png, each class a different colour blob."""
    rng = np.random.default_rng(0)
    for split, count in (("train", n), ("test", 2)):
        for k, name in enumerate(CLASSES):
            d = root / split / name
            d.mkdir(parents=True, exist_ok=True)
            for i in range(count):
                img = rng.integers(0, 40, (*size, 3), dtype=np.uint8)
                img[4:12, 4 + 2 * k : 10 + 2 * k, k] = 250
                Image.fromarray(img if rgb else img.max(axis=2)).save(d / f"{i}.png")
    return root


# -- the readers --------------------------------------------------------------------------------------


def test_image_folder_classes_shapes_and_skipped_files(tmp_path, capsys):
    root = _folder(tmp_path / "ds")
    (root / "train" / "cat" / "notes.txt").write_text("not an image")
    (train, y_train), (test, y_test), classes = load_image_folder(root)
    assert classes == CLASSES
    assert train.shape == (12, 20, 20, 3) and train.dtype == np.float32
    assert 0 <= train.min() <= train.max() <= 1
    # sorted by file name across classes (0.png of each class, then 1.png, …), not class by class
    assert y_train.tolist() == [0, 1, 2] * 4 and y_train.dtype == np.int64
    assert test.shape == (6, 20, 20, 3) and y_test.tolist() == [0, 1, 2, 0, 1, 2]
    assert "1 non-image file(s) skipped" in capsys.readouterr().err


def test_image_folder_skips_macos_and_hidden_files_and_folders(tmp_path, capsys):
    """A Mac's archive or copy puts `._0.png` AppleDouble files beside each image (named as images, not
    images: the whole load failed), and Jupyter's checkpoints or a NAS's thumbnails inside a class folder
    were trained on as samples; `__MACOSX` beside the classes was a class."""
    root = _folder(tmp_path / "ds")
    (root / "train" / "cat" / "._0.png").write_bytes(b"\x00\x05\x16\x07 AppleDouble")
    for hidden in (".ipynb_checkpoints", "@eaDir"):
        (root / "train" / "cat" / hidden).mkdir()
        shutil.copy(root / "train" / "cat" / "0.png", root / "train" / "cat" / hidden / "0-checkpoint.png")
    (root / "train" / "__MACOSX" / "cat").mkdir(parents=True)
    (root / "train" / "__MACOSX" / "cat" / "._0.png").write_bytes(b"\x00\x05\x16\x07")
    (train, _), (test, _), classes = load_image_folder(root)
    assert classes == CLASSES and len(train) == 12 and len(test) == 6
    assert "1 non-image file(s) skipped" in capsys.readouterr().err


def test_an_idx_folder_or_npz_with_labels_no_image_teaches_is_one_line(tmp_path):
    """Labels counted from 1 (EMNIST letters) made an IDX folder's class 0 that no image trains (the .npz
    reader refused it); a label that is an id (10**9) built a billion class names before any check."""
    from capsctl.data import sources

    rng = np.random.default_rng(0)
    labels = rng.integers(1, 4, 20)  # 1..3
    write_set(tmp_path / "idx", {"train-images": rng.integers(0, 256, (20, 28, 28)), "train-labels": labels,
                                 "t10k-images": rng.integers(0, 256, (6, 28, 28)),
                                 "t10k-labels": rng.integers(1, 4, 6)})
    refused = r"train-labels-idx1-ubyte.gz has no image of class 0 \(labels 0..3\); every class needs"
    with pytest.raises(CapsctlError, match=refused):
        sources.load_path(str(tmp_path / "idx"), None)
    x = np.zeros((4, 8, 8), np.uint8)
    np.savez(tmp_path / "ids.npz", x_train=x, y_train=np.array([0, 1, 10**9, 1]), x_test=x[:2],
             y_test=np.array([0, 1]))
    with pytest.raises(CapsctlError, match=r"label 1,000,000,000: labels are class indices 0..N-1"):
        load_npz(tmp_path / "ids.npz")


def test_image_folder_mixed_sizes_need_image_size_which_pads(tmp_path):
    root = _folder(tmp_path / "ds")
    Image.fromarray(np.full((10, 30, 3), 255, np.uint8)).save(root / "test" / "dog" / "wide.png")
    with pytest.raises(CapsctlError, match=r"differ in size: .*is 20x20, .*wide.png is 10x30.*--image-size"):
        load_image_folder(root)
    (train, _), (test, _), _ = load_image_folder(root, (16, 16))
    assert train.shape[1:] == test.shape[1:] == (16, 16, 3)
    wide = test[6]  # [cat 0, dog 0, eel 0, cat 1, dog 1, eel 1, dog wide]
    rows = np.flatnonzero(wide.max(axis=(1, 2)) > 0.5)
    assert rows.min() > 0 and rows.max() < 15  # aspect kept: 10x30 fits as about 5x16, padded above/below


def test_image_folder_mixed_gray_and_colour_go_to_the_majority(tmp_path, capsys):
    root = _folder(tmp_path / "ds", rgb=False)
    Image.fromarray(np.zeros((20, 20, 3), np.uint8)).save(root / "train" / "eel" / "colour.png")
    (train, _), _, _ = load_image_folder(root)
    assert train.shape[3] == 1
    assert "1 of 19 images converted to gray" in capsys.readouterr().err


@pytest.mark.parametrize(("damage", "fragment"), [
    (lambda r: (r / "test" / "fox").mkdir(), "test class 'fox' is not among the train/ classes"),
    (lambda r: [f.unlink() for f in (r / "train" / "dog").iterdir()], "empty class folder"),
    (lambda r: (r / "train" / "dog" / "0.png").write_bytes(b""), "0.png: empty file"),
    (lambda r: (r / "train" / "dog" / "1.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"x" * 40), "1.png: "),
    (lambda r: (r / "train" / "dog" / "1.png").write_bytes((r / "train" / "dog" / "1.png").read_bytes()[:60]),
     "1.png: truncated or corrupt"),
    (lambda r: [shutil.rmtree(r / s / c) for s in ("train", "test") for c in ("dog", "eel")],
     "one class folder ('cat'); a classifier needs two or more"),
])
def test_image_folder_problems_are_one_error_naming_the_file(tmp_path, damage, fragment):
    root = _folder(tmp_path / "ds")
    damage(root)
    with pytest.raises(CapsctlError, match=None) as info:
        load_image_folder(root)
    assert fragment in str(info.value) and "\n" not in str(info.value)


def _npz(path: Path, **override) -> Path:
    rng = np.random.default_rng(0)
    arrays = {"x_train": rng.integers(0, 256, (6, 12, 12), dtype=np.uint8), "y_train": np.arange(6) % 3,
              "x_test": rng.integers(0, 256, (3, 12, 12), dtype=np.uint8), "y_test": np.arange(3),
              "class_names": np.array(CLASSES)}
    arrays.update(override)
    np.savez(path, **{k: v for k, v in arrays.items() if v is not None})
    return path


def test_npz_reads_nhw_and_nhwc_with_class_names(tmp_path):
    (x, y), (xt, _), classes = load_npz(_npz(tmp_path / "a.npz"))
    assert x.shape == (6, 12, 12, 1) and xt.shape == (3, 12, 12, 1) and classes == CLASSES
    assert y.dtype == np.int64 and y.tolist() == [0, 1, 2, 0, 1, 2]
    rgb = np.zeros((4, 8, 8, 3), np.uint8)
    (x, _), _, classes = load_npz(_npz(tmp_path / "b.npz", x_train=rgb, y_train=np.array([0, 1, 1, 0]),
                                       x_test=rgb[:2], y_test=np.array([1, 0]), class_names=None))
    assert x.shape == (4, 8, 8, 3) and classes == ("0", "1")


@pytest.mark.parametrize(("override", "fragment"), [
    ({"x_test": None}, "missing key 'x_test'"),
    ({"x_train": np.zeros((6, 12, 12), np.float32)}, "x_train has dtype float32, expected uint8"),
    ({"y_train": np.array([0, 1, 2, 3, 1, 2])}, "label 3 is out of range for 3 class_names"),
    ({"y_test": np.array([0, 1])}, "x_test has 3 images but y_test has 2 labels"),
    ({"y_train": np.array([0, 1, 2, -1, 1, 2])}, "y_train holds label -1"),
    ({"class_names": np.array(["a", "b", "a"])}, "class_names must be distinct, non-empty strings"),
    ({"class_names": np.array(["a", "", "c"])}, "class_names must be distinct, non-empty strings"),
    # a stray label among digits made classes no image teaches (here 3 and 4 of 0..5)
    ({"y_train": np.array([0, 1, 2, 5, 1, 2]), "class_names": None},
     "y_train has no image of class 3, 4 (labels 0..5); every class needs training images"),
    ({"y_train": np.array([0, 2, 2, 0, 0, 2])}, "y_train has no image of class dog (3 class_names)"),
    ({"x_train": b"not an archive"}, "not an .npz archive (not a zip file)"),
])
def test_npz_problems_are_one_line(tmp_path, override, fragment):
    path = tmp_path / "bad.npz"
    if isinstance(override.get("x_train"), bytes):  # (the whole file)
        path.write_bytes(override["x_train"])
    else:
        _npz(path, **override)
    with pytest.raises(CapsctlError) as info:
        load_npz(path)
    assert fragment in str(info.value), str(info.value)


def test_idx_folder_as_a_path_and_registry_names_still_work(tmp_path, mnist_dir):
    rng = np.random.default_rng(0)
    write_set(tmp_path / "idx", {"train-images": rng.integers(0, 256, (8, 28, 28)),
                                 "train-labels": np.arange(8) % 4,
                                 "t10k-images": rng.integers(0, 256, (4, 28, 28)),
                                 "t10k-labels": np.arange(4)})
    ds = datasets.load(str(tmp_path / "idx"))
    assert ds.train().images.shape == (8, 28, 28, 1) and ds.classes == ("0", "1", "2", "3")
    named = datasets.load("mnist", mnist_dir)
    assert named.classes == tuple(str(d) for d in range(10)) and named.test().images.shape[1:] == (28, 28, 1)


# -- the spec stores class names ------------------------------------------------------------------------


def test_class_names_round_trip_and_old_specs_load():
    spec = ModelSpec(num_classes=3, class_names=CLASSES)
    assert ModelSpec.from_json(spec.to_json()) == spec
    assert "class_names" not in ModelSpec().to_json()  # a spec without names keeps its old JSON
    assert ModelSpec.from_json(ModelSpec().to_json()).class_names is None
    with pytest.raises(CapsctlError, match="class_names has 2 names for num_classes 3"):
        ModelSpec(num_classes=3, class_names=("a", "b"))
    with pytest.raises(CapsctlError, match="twice"):
        ModelSpec(num_classes=2, class_names=("a", "a"))


# -- end to end ---------------------------------------------------------------------------------------


def _train_tiny(tmp_path: Path, root: Path, capsys) -> Path:
    """The tiny model trained one epoch on the folder `root`; its run folder."""
    (tmp_path / "tiny.json").write_text(json.dumps(TINY))
    run = tmp_path / "run"
    code, _, err = run_cli(["train", "--spec", tmp_path / "tiny.json", "--dataset", root, "--epochs", "1",
                            "--batch-size", "4", "-q", "--out", run], capsys)
    assert code == 0, err
    return run


@pytest.mark.torch
def test_train_on_an_rgb_image_folder_then_eval_and_predict_print_names(tmp_path, capsys):
    root = _folder(tmp_path / "ds")
    run = _train_tiny(tmp_path, root, capsys)
    spec, _ = load_model(run / "model.safetensors")
    assert (spec.in_channels, spec.num_classes, spec.class_names) == (3, 3, CLASSES)
    code, out, err = run_cli(["eval", run / "model.safetensors", "--dataset", root, "--json"], capsys)
    assert code == 0, err
    assert json.loads(out)["images"] == 6
    code, out, err = run_cli(["predict", run / "model.safetensors", root / "test", "--json", "--top", "3"],
                             capsys)
    assert code == 0, err
    rows = [json.loads(line) for line in out.splitlines()]
    assert len(rows) == 6 and all(sorted(t["class"] for t in r["top"]) == list(CLASSES) for r in rows)
    # a gray model refuses the colour data set with one line
    gray = tmp_path / "gray.safetensors"
    gray_spec = ModelSpec.from_dict({**TINY, "num_classes": 3, "class_names": list(CLASSES)})
    save_model(gray, gray_spec, init_weights(gray_spec, 0))
    code, out, err = run_cli(["eval", gray, "--dataset", root], capsys)
    assert_one_line_error(code, out, err, "takes 1-channel images", "have 3")


@pytest.mark.parametrize(("args", "fragment"), [
    (["--dataset", "no/such/place"], "--dataset"),
    (["--dataset", "{ds}", "--image-size", "0x5"], "--image-size"),
    (["--dataset", "{mixed}"], "differ in size"),
    (["--dataset", "{npz}"], "missing key 'y_test'"),
    # a spec printed from a model of dark ink on light, reused on white-on-black data (shifts filled with
    # white, every predicted image inverted)
    (["--dataset", "{ds}", "--spec", "{light}"], "background 'light', but the training images are not"),
    # a hand-written input capsule count or size for per-position weights: the fix is to leave it out
    # (it advised "use a model with shared capsule weights", or dropped the size without a word)
    (["--dataset", "{ds}", "--spec", "{inputs}"], "capsule.num_inputs is 7 but 20x20"),
    (["--dataset", "{ds}", "--spec", "{size}"], "capsule.image_size is 41x33 but the training images"),
    # class names of a spec in another order than the folder's: label j was learnt as the folder's j-th
    # class and named the spec's j-th (eval, matching by name, then scored against swapped labels)
    (["--dataset", "{ds}", "--spec", "{names}"], "class_names ['dog', 'cat', 'eel'], but the training"),
])
def test_train_refuses_bad_user_data_with_one_line_and_writes_nothing(tmp_path, capsys, args, fragment):
    ds = _folder(tmp_path / "ds")
    mixed = _folder(tmp_path / "mixed")
    Image.fromarray(np.zeros((9, 9), np.uint8)).save(mixed / "train" / "cat" / "small.png")
    npz = _npz(tmp_path / "bad.npz", y_test=None)
    light = tmp_path / "light.json"
    light.write_text(json.dumps({**TINY, "background": "light"}))
    inputs, size = tmp_path / "inputs.json", tmp_path / "size.json"
    unshared = {**TINY["capsule"], "shared": False}
    inputs.write_text(json.dumps({**TINY, "capsule": {**unshared, "num_inputs": 7}}))
    size.write_text(json.dumps({**TINY, "capsule": {**unshared, "image_size": [41, 33]}}))
    names = tmp_path / "names.json"
    names.write_text(json.dumps({**TINY, "num_classes": 3, "class_names": ["dog", "cat", "eel"]}))
    args = [a.format(ds=ds, mixed=mixed, npz=npz, light=light, inputs=inputs, size=size, names=names)
            for a in args]
    code, out, err = run_cli(["train", *args, "--epochs", "1", "-q", "--out", tmp_path / "run"], capsys)
    assert_one_line_error(code, out, err, fragment)
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("backend_name", BACKENDS)
def test_rgb_model_agrees_with_the_reference_on_each_backend(backend_name):
    """Cross-backend parity on a 3-channel model: each backend within 1e-4 of the numpy reference."""
    from capsctl.backend import get_backend

    spec = ModelSpec(in_channels=3, num_classes=3, class_names=CLASSES)
    weights = init_weights(spec, 1)
    rng = np.random.default_rng(0)
    for k, v in weights.items():
        if k.endswith(".bias"):
            weights[k] = rng.uniform(0, 0.05, v.shape).astype(np.float32)
    x = rng.uniform(0, 1, (4, 28, 28, 3)).astype(np.float32)
    want = reference.forward(spec, weights, x)[0]
    got = get_backend(backend_name).runner(spec, weights).scores(x)
    np.testing.assert_allclose(got, want, atol=1e-4)


@pytest.mark.torch
def test_export_and_import_keep_three_channels_and_class_names(tmp_path, capsys):
    spec = ModelSpec(in_channels=3, num_classes=3, class_names=CLASSES)
    save_model(tmp_path / "rgb.safetensors", spec, init_weights(spec, 0))
    code, _, err = run_cli(["export", tmp_path / "rgb.safetensors", "--out", tmp_path / "rgb.pt"], capsys)
    assert code == 0, err
    code, _, err = run_cli(["import", tmp_path / "rgb.pt", "--out", tmp_path / "back.safetensors"], capsys)
    assert code == 0, err
    back, weights = load_model(tmp_path / "back.safetensors")
    assert back == spec and weights["trunk.0.kernel"].shape[2] == 3
    # ONNX: three input channels, the same scores as the reference on a colour image
    import onnxruntime as ort

    code, _, err = run_cli(["export", tmp_path / "rgb.safetensors", "--format", "onnx", "--out",
                            tmp_path / "rgb.onnx"], capsys)
    assert code == 0, err
    session = ort.InferenceSession(str(tmp_path / "rgb.onnx"), providers=["CPUExecutionProvider"])
    assert session.get_inputs()[0].shape[3] == 3
    x = np.random.default_rng(1).uniform(0, 1, (2, 30, 26, 3)).astype(np.float32)
    (got,) = session.run(["scores"], {"images": x})
    np.testing.assert_allclose(got, reference.forward(spec, weights, x)[0], atol=1e-4)


def test_loader_keeps_colour_with_three_channels(tmp_path):
    from capsctl.data.images import load_image

    rgb = np.zeros((8, 6, 3), np.uint8)
    rgb[2:5, 1:4] = (200, 30, 90)
    Image.fromarray(rgb).save(tmp_path / "c.png")
    got = load_image(tmp_path / "c.png", channels=3)
    assert got.shape == (8, 6, 3) and got.dtype == np.float32
    np.testing.assert_allclose(got, rgb / 255.0, atol=1e-6)
    assert load_image(tmp_path / "c.png").shape == (8, 6)  # the default stays gray
    Image.fromarray(rgb[..., 0]).save(tmp_path / "g.png")
    gray3 = load_image(tmp_path / "g.png", channels=3)
    assert np.array_equal(gray3[..., 0], gray3[..., 2])
    np.save(tmp_path / "c.npy", rgb)
    np.testing.assert_allclose(load_image(tmp_path / "c.npy", channels=3), got, atol=1e-6)
    with pytest.raises(CapsctlError, match="1 \\(gray\\) or 3 \\(RGB\\)"):
        load_image(tmp_path / "c.png", channels=2)


@pytest.mark.torch
def test_eval_and_eval_pairs_name_the_classes_of_a_model_with_names(tmp_path, capsys):
    spec = ModelSpec.from_dict({**TINY, "in_channels": 3, "num_classes": 3, "class_names": list(CLASSES)})
    save_model(tmp_path / "rgb.safetensors", spec, init_weights(spec, 0))
    root = _folder(tmp_path / "ds")
    code, out, err = run_cli(["eval", tmp_path / "rgb.safetensors", "--dataset", root, "--json"], capsys)
    assert code == 0, err
    d = json.loads(out)
    assert list(d["per_class"]) == list(CLASSES) and all(0 <= v <= 1 for v in d["per_class"].values())
    assert sum(d["per_class"].values()) / 3 == pytest.approx(d["accuracy"])  # 2 test images a class
    code, out, err = run_cli(["eval", tmp_path / "rgb.safetensors", "--dataset", root], capsys)
    assert code == 0, err
    assert "per class: cat " in out and ", dog " in out and ", eel " in out
    for extra in (["--json"], []):
        code, out, err = run_cli(["eval-pairs", tmp_path / "rgb.safetensors", "--dataset", root, *extra],
                                 capsys)
        assert code == 0, err
        if extra:
            per_class = json.loads(out)["per_class"]
            assert list(per_class) == list(CLASSES) and all(0 <= v <= 1 for v in per_class.values())
        else:
            assert "per class: cat " in out and ", eel " in out


@pytest.mark.torch
def test_inspect_and_predict_an_rgb_model_print_class_names(tmp_path, capsys):
    spec = ModelSpec(in_channels=3, num_classes=3, class_names=CLASSES)
    save_model(tmp_path / "rgb.safetensors", spec, init_weights(spec, 0))
    root = _folder(tmp_path / "ds")
    png = root / "test" / "dog" / "0.png"
    code, out, err = run_cli(["inspect", tmp_path / "rgb.safetensors", png, "--top", "2"], capsys)
    assert code == 0, err
    assert "top 2: " in out and all(f" {name} │" in out for name in CLASSES)
    code, out, err = run_cli(["predict", tmp_path / "rgb.safetensors", png, "--csv", "--top", "3"], capsys)
    assert code == 0, err
    row = out.splitlines()[1].split(",")
    assert sorted(row[1:7:2]) == list(CLASSES)


@pytest.mark.torch
def test_eval_scores_a_folder_by_its_class_names_not_its_folder_positions(tmp_path, capsys):
    spec = ModelSpec.from_dict(TINY)  # 10 unnamed classes: "0".."9"
    save_model(tmp_path / "m.safetensors", spec, init_weights(spec, 0))
    root = tmp_path / "ds"
    rng = np.random.default_rng(0)
    for split in ("train", "test"):
        for digit in "3579":  # no class 0: positions 0..3 in the folder, classes 3, 5, 7, 9 of the model
            (root / split / digit).mkdir(parents=True)
            image = rng.integers(0, 256, (20, 20), dtype=np.uint8)
            Image.fromarray(image).save(root / split / digit / "a.png")
    code, out, err = run_cli(["eval", tmp_path / "m.safetensors", "--dataset", root, "--json"], capsys)
    assert code == 0, err
    per_class = json.loads(out)["per_class"]
    assert [c for c, v in per_class.items() if v is not None] == ["3", "5", "7", "9"]
    # a model with names of its own and data with other names: refused
    named = ModelSpec.from_dict({**TINY, "num_classes": 4, "class_names": ["3", "5", "7", "cat"]})
    save_model(tmp_path / "named.safetensors", named, init_weights(named, 0))
    for command in ("eval", "eval-pairs"):
        code, out, err = run_cli([command, tmp_path / "named.safetensors", "--dataset", root], capsys)
        assert_one_line_error(code, out, err, "class '9'", "not one of the model's classes")


@pytest.mark.torch
def test_eval_scores_by_index_where_the_data_or_the_model_names_no_classes(tmp_path, capsys):
    # a model with real names (trained on a named set) on the same classes as an .npz without class_names,
    # and an unnamed model on named data: both scored by index, as before names were compared
    named = ModelSpec.from_dict({**TINY, "num_classes": 3, "class_names": list(CLASSES)})
    unnamed = ModelSpec.from_dict({**TINY, "num_classes": 3})
    for name, spec in (("named", named), ("unnamed", unnamed)):
        save_model(tmp_path / f"{name}.safetensors", spec, init_weights(spec, 0))
    images = {"x_train": np.zeros((6, 20, 20), np.uint8), "x_test": np.zeros((3, 20, 20), np.uint8)}
    bare = _npz(tmp_path / "bare.npz", **images, class_names=None)
    with_names = _npz(tmp_path / "with.npz", **images)
    for model, data in (("named", bare), ("unnamed", with_names)):
        args = ["eval", tmp_path / f"{model}.safetensors", "--dataset", data, "--json"]
        code, out, err = run_cli(args, capsys)
        assert code == 0, err
        assert json.loads(out)["images"] == 3


@pytest.mark.torch
def test_a_model_trained_on_dark_ink_on_light_predicts_its_own_images_as_trained(tmp_path, capsys,
                                                                                  monkeypatch):
    """Gray data of dark ink on a light background: the model records background 'light', and `predict`
    (--invert auto) scores its test files as `eval` sees them, not inverted; a dark-background image is
    brought to light for it, as a light one is brought to dark for an MNIST model."""
    from capsctl.backend import get_backend
    from capsctl.data.images import data_background, load_image

    root = _folder(tmp_path / "ds", rgb=False)
    for png in root.rglob("*.png"):  # dark ink on white paper
        Image.fromarray(255 - np.asarray(Image.open(png))).save(png)
    run = _train_tiny(tmp_path, root, capsys)
    spec, weights = load_model(run / "model.safetensors")
    assert spec.background == "light" and ModelSpec.from_json(spec.to_json()) == spec
    _, (x_test, _), _ = load_image_folder(root)
    files = sorted((root / "test").rglob("*.png"), key=lambda p: (p.stem, p.parent.name))
    code, out, err = run_cli(["predict", run / "model.safetensors", *files, "--json", "--top", "3"], capsys)
    assert code == 0, err
    got = [{t["index"]: t["score"] for t in json.loads(line)["top"]} for line in out.splitlines()]
    want = get_backend("torch").runner(spec, weights).scores(x_test)
    for row, scores in zip(got, want, strict=True):
        assert [row[j] for j in range(3)] == pytest.approx(scores.tolist(), abs=1e-5)
    # what --invert auto does to one file, for each kind of model
    pixels = np.asarray(Image.open(files[0]), np.float32) / 255
    assert np.allclose(load_image(files[0], spec=spec), pixels, atol=1e-6)
    assert np.allclose(load_image(files[0], spec=spec.replace(background=None)), 1 - pixels, atol=1e-6)
    assert data_background(x_test) == "light" and data_background(1 - x_test) is None
    assert data_background(np.repeat(x_test, 3, axis=3)) is None  # colour: never inverted
    # its overlap pairs are the ink merged on white paper (a maximum of light images is blank paper)
    from capsctl.data import composites
    from capsctl.data.composites import make_composites

    _, (x_test, y_test), _ = load_image_folder(root)
    made: list = []
    monkeypatch.setattr(composites, "make_composites", lambda *a, **k: made.append(make_composites(*a, **k))
                        or made[-1])
    code, out, err = run_cli(["eval-pairs", run / "model.safetensors", "--dataset", root, "--layout",
                              "overlap", "--json"], capsys)
    assert code == 0, err
    comp = make_composites(x_test, y_test, layout="overlap", light=True)
    assert comp.images.min() < 0.1  # ink
    np.testing.assert_array_equal(made[0].images, comp.images)
    from capsctl.data.composites import score_sets

    scored = score_sets(get_backend("torch").runner(spec, weights).scores(comp.images), comp.labels)
    assert json.loads(out)["accuracy"] == pytest.approx(scored["accuracy"])
    assert json.loads(out)["confident_accuracy"] == pytest.approx(scored["confident_accuracy"])


def _modes_folder(root: Path, majority: str) -> dict[str, Path]:
    """root/train/a/ with one digit-like image per Pillow mode (ink on a transparent sheet where there is
    alpha), plus three of the majority mode; root/test/a/ one image. Returns the file of each mode."""
    d = root / "train" / "a"
    d.mkdir(parents=True)
    ink = np.zeros((12, 12), np.uint8)
    ink[3:9, 5:7] = 1
    alpha = (ink * 255).astype(np.uint8)
    colour = np.stack([ink * 200, ink * 40, ink * 90], axis=2).astype(np.uint8)
    images = {
        "RGBA": Image.fromarray(np.dstack([np.zeros((12, 12, 3), np.uint8), alpha]), "RGBA"),  # black ink
        "LA": Image.fromarray(np.dstack([np.full((12, 12), 255, np.uint8), alpha]), "LA"),  # white ink
        "I;16": Image.fromarray(ink.astype(np.uint16) * 50000),  # 16-bit gray, values over 255
        "P": Image.new("P", (12, 12)),  # entry 0 (transparent) the sheet, entry 1 (black) the ink
    }
    images["P"].putpalette([255, 255, 255] + [0, 0, 0] * 255)
    images["P"].putdata(ink.ravel().tolist())
    files = {}
    for mode, im in images.items():
        files[mode] = d / f"{mode.replace(';', '')}.png"
        im.save(files[mode], transparency=0) if mode == "P" else im.save(files[mode])
    for i in range(len(images) + 1):
        base = Image.fromarray(colour) if majority == "RGB" else Image.fromarray(ink * 255)
        base.save(d / f"plain{i}.png")
    (root / "test" / "a").mkdir(parents=True)
    Image.fromarray(ink * 255).convert(majority).save(root / "test" / "a" / "t.png")
    for split in ("train", "test"):  # a second class (a classifier needs two), of plain images
        (root / split / "b").mkdir()
        Image.fromarray(ink.T * 255).convert(majority).save(root / split / "b" / "zz.png")
    return files


@pytest.mark.parametrize("majority", ["RGB", "L"])
def test_image_folder_decodes_alpha_and_16_bit_files_as_predict_reads_them(tmp_path, majority):
    """Alpha composited (not dropped: black ink on a transparent sheet was an all-black image) and 16-bit
    gray rescaled (not clipped to 0/255 in a colour set): every file as `predict` reads it, to 8 bits."""
    from capsctl.data.images import load_image

    root = tmp_path / "ds"
    files = _modes_folder(root, majority)
    (x, _), _, _ = load_image_folder(root)
    channels = 3 if majority == "RGB" else 1
    order = sorted((root / "train" / "a").iterdir(), key=lambda p: p.name)  # (b's zz.png sorts last)
    for path, got in zip(order, x, strict=False):
        want = load_image(path, invert="no", channels=channels).reshape(got.shape)
        assert np.abs(got - want).max() <= 1 / 255 + 1e-6, path.name
    for mode in ("RGBA", "LA", "I;16", "P"):  # each of them has its ink: not a blank image
        got = x[order.index(files[mode])]
        assert got.max() - got.min() > 0.5, mode


def test_image_folder_turns_images_upright_by_their_exif_orientation(tmp_path):
    """A portrait photo stored on its side (EXIF orientation 6) trains as it is seen, as `predict` reads
    it: upright, with its upright size (it would otherwise differ in size from the others)."""
    from capsctl.data.images import load_image

    ink = np.zeros((16, 10), np.uint8)
    ink[2:14, 4:6] = 255
    ink[2, 2:8] = 255
    for split in ("train", "test"):
        for cls, img in (("a", ink), ("b", ink[::-1])):
            (tmp_path / "ds" / split / cls).mkdir(parents=True)
            Image.fromarray(img).save(tmp_path / "ds" / split / cls / "0.png")
    exif = Image.Exif()
    exif[0x0112] = 6
    side = tmp_path / "ds" / "train" / "a" / "1.jpg"
    Image.fromarray(np.ascontiguousarray(np.rot90(ink, 1))).save(side, exif=exif, quality=100)
    (x, y), _, _ = load_image_folder(tmp_path / "ds")
    assert x.shape == (3, 16, 10, 1)
    assert list(y) == [0, 1, 0]  # by name across classes: a/0.png, b/0.png, a/1.jpg
    got = x[2, :, :, 0]
    assert np.abs(got - ink / 255.0).max() < 0.25
    assert np.abs(got - load_image(side, invert="no")).max() <= 1 / 255 + 1e-6


def test_a_gray_image_saved_with_a_palette_counts_as_gray(tmp_path, capsys):
    """Some tools save 8-bit gray as a palette PNG: a palette of grays is a gray image, not colour (a
    folder of them trained a 3-channel model, with a note that the gray files were converted)."""
    ink = np.zeros((12, 12), np.uint8)
    ink[3:9, 5:7] = 200
    for split in ("train", "test"):
        for cls, img in (("a", ink), ("b", ink.T)):
            d = tmp_path / "ds" / split / cls
            d.mkdir(parents=True)
            Image.fromarray(img).save(d / "plain.png")
            for i in range(2):
                pal = Image.fromarray(img).convert("P", palette=Image.Palette.ADAPTIVE, colors=4)
                pal.putpalette([v for g in (0, 100, 200, 255) for v in (g, g, g)])
                pal.putdata([{0: 0, 200: 2}[int(v)] for v in img.ravel()])
                pal.save(d / f"pal{i}.png")
    (x, _), _, _ = load_image_folder(tmp_path / "ds")
    assert x.shape[-1] == 1
    assert "converted" not in capsys.readouterr().err
    np.testing.assert_allclose(x[0, :, :, 0], ink / 255.0, atol=1e-6)  # a/pal0.png sorts first


def test_image_size_pads_dark_ink_on_light_with_white_and_predict_fit_alike(tmp_path):
    """`--image-size` padded every image with black: beside white pages most of the border was black, the
    model lost `background: "light"` and `predict --invert auto` turned every image it was given."""
    from capsctl.data.images import data_background, load_image

    ink = np.full((28, 20), 255, np.uint8)
    ink[6:22, 9:11] = 0
    for split in ("train", "test"):
        for cls, img in (("a", ink), ("b", ink.T.copy())):
            (tmp_path / "ds" / split / cls).mkdir(parents=True)
            Image.fromarray(img).save(tmp_path / "ds" / split / cls / "0.png")
    (x, _), (xt, _), _ = load_image_folder(tmp_path / "ds", image_size=(28, 28))
    assert x[0, :, :4, 0].min() == 1.0 and x[0].min() == 0.0  # white bars beside the page, dark ink
    assert data_background(x) == "light"
    light = ModelSpec.from_dict({**TINY, "background": "light"})
    test = tmp_path / "ds" / "test"
    for k, path in enumerate([test / "a" / "0.png", test / "b" / "0.png"]):
        got = load_image(path, resize=(28, 28), fit=True, spec=light)  # as the model saw its folder
        assert np.abs(got - xt[k, :, :, 0]).max() <= 1 / 255 + 1e-6
    # for an MNIST model the page is inverted first, then padded with black
    np.testing.assert_array_equal(load_image(path, resize=(28, 40), fit=True)[:, :6], 0.0)


@pytest.mark.torch
def test_a_limit_that_keeps_one_class_is_refused_and_fewer_classes_said(tmp_path, capsys):
    """Kaggle's layout (train/cat/cat.0.jpg, train/dog/dog.0.jpg) sorts every cat before any dog, so
    `--limit N` trained on cats alone, exit 0, a model that says "cat" for everything."""
    rng = np.random.default_rng(0)
    for split, count in (("train", 6), ("test", 2)):
        for k, name in enumerate(("cat", "dog", "eel")):
            d = tmp_path / "pets" / split / name
            d.mkdir(parents=True)
            for i in range(count):
                img = rng.integers(0, 40, (20, 20), dtype=np.uint8)
                img[4:12, 4 + 2 * k: 10 + 2 * k] = 250
                Image.fromarray(img).save(d / f"{name}.{i}.png")
    spec = tmp_path / "tiny.json"
    spec.write_text(json.dumps(TINY))
    args = ["train", "--dataset", tmp_path / "pets", "--spec", spec, "--epochs", "1", "-q"]
    code, out, err = run_cli([*args, "--limit", "5", "--out", tmp_path / "r1"], capsys)
    assert_one_line_error(code, out, err, "--limit 5: the first 5 training images (in the data's order) are "
                          "all of class 'cat'; a classifier needs two or more")
    assert not (tmp_path / "r1").exists()
    code, out, err = run_cli([*args, "--limit", "8", "--out", tmp_path / "r2"], capsys)
    assert code == 0, err
    said = " ".join(err.split())  # (the console wraps at its width)
    assert "note: --limit 8 keeps 2 of the data's 3 classes (the first images in its order); none of eel" \
        in said


def _png_16_bit_gray_alpha(path: Path, gray: np.ndarray, alpha: np.ndarray) -> None:
    """Write a PNG of colour type 4 (gray+alpha), 16 bits a sample: Pillow can read it, not write it."""
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    h, w = gray.shape
    rows = b"".join(b"\0" + np.stack([gray, alpha], axis=-1).astype(">u2").tobytes() for gray, alpha in
                    zip(gray, alpha, strict=True))
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 16, 4, 0, 0, 0))
                     + chunk(b"IDAT", zlib.compress(rows)) + chunk(b"IEND", b""))


def test_a_16_bit_gray_alpha_png_counts_as_gray(tmp_path, capsys):
    """Pillow opens a 16-bit gray+alpha PNG as RGBA: a folder of them trained a 3-channel model of three
    equal channels. Their header says gray, so the folder is gray, and decodes as `predict` reads it."""
    from capsctl.data.images import load_image

    ink = np.zeros((12, 12), np.uint16)
    ink[3:9, 5:7] = 60000
    opaque = np.full((12, 12), 65535, np.uint16)
    for split in ("train", "test"):
        for cls, img in (("a", ink), ("b", ink.T)):
            d = tmp_path / "ds" / split / cls
            d.mkdir(parents=True)
            for i in range(2):
                _png_16_bit_gray_alpha(d / f"{i}.png", img, opaque)
    first = tmp_path / "ds" / "train" / "a" / "0.png"
    assert Image.open(first).mode == "RGBA"  # what made it colour
    (x, _), _, _ = load_image_folder(tmp_path / "ds")
    assert x.shape[-1] == 1
    assert "converted" not in capsys.readouterr().err
    np.testing.assert_allclose(x[0, :, :, 0], load_image(first, invert="no"), atol=1 / 255 + 1e-6)
    assert x[0].max() > 0.9 and x[0].min() == 0.0
