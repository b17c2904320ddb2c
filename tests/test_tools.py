"""The data-making scripts under tools/: IDX -> ImageFolder of PNGs (pixel-exact, IDX order), and the
colour digit set (.npz, seeded, foreground and background apart)."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

import numpy as np
import pytest
from PIL import Image

from capsctl.data import datasets

from ._helpers import write_set

TOOLS = Path(__file__).resolve().parents[1] / "tools"


def _tool(name: str) -> ModuleType:
    # tools/ is a folder of scripts, not a package: load the file itself
    spec = importlib.util.spec_from_file_location(f"_tool_{name}", TOOLS / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def _tiny_idx(folder: Path) -> dict[str, np.ndarray]:
    """Seven 6x5 training and four test images of 3 classes, random bytes."""
    rng = np.random.default_rng(0)
    arrays = {
        "train-images": rng.integers(0, 256, (7, 6, 5)).astype(np.uint8),
        "train-labels": np.array([2, 0, 1, 1, 0, 2, 0], np.uint8),
        "t10k-images": rng.integers(0, 256, (4, 6, 5)).astype(np.uint8),
        "t10k-labels": np.array([1, 2, 0, 2], np.uint8),
    }
    for key in ("train-images", "t10k-images"):
        arrays[key][:, 0, :2] = (0, 255)  # pure paper and pure ink in every image
    write_set(folder, arrays)
    return arrays


def test_export_imagefolder_is_pixel_exact_and_sorts_in_idx_order(tmp_path, capsys):
    tool = _tool("export_imagefolder")
    arrays = _tiny_idx(tmp_path / "idx")
    out = tmp_path / "folder"
    assert tool.main([str(tmp_path / "idx"), str(out), "-q"]) == 0
    assert "11 PNG files (7 train, 4 test)" in capsys.readouterr().out
    for split, prefix in (("train", "train"), ("test", "t10k")):
        files = sorted((out / split).glob("*/*.png"), key=lambda p: p.name)
        # names sort in IDX order across the class folders, and each lies in its label's folder
        assert [p.name for p in files] == [f"{i:05d}.png" for i in range(len(arrays[f"{prefix}-labels"]))]
        assert [int(p.parent.name) for p in files] == arrays[f"{prefix}-labels"].tolist()
        for i, p in enumerate(files):
            with Image.open(p) as im:
                assert im.mode == "L"
                assert np.array_equal(np.asarray(im), arrays[f"{prefix}-images"][i])
    # capsctl reads the tree as the IDX set itself: the same arrays, in the same order (the folder loader
    # orders images by file name across classes), so both paths train alike
    ds, ref = datasets.load(str(out)), datasets.load(str(tmp_path / "idx"))
    assert ds.classes == ("0", "1", "2")
    for got, want in ((ds.train(), ref.train()), (ds.test(), ref.test())):
        assert np.array_equal(got.images, want.images) and np.array_equal(got.labels, want.labels)


def test_export_imagefolder_folder_names_keep_the_label_order(tmp_path, capsys):
    tool = _tool("export_imagefolder")
    arrays = _tiny_idx(tmp_path / "idx")
    # a registry name with --data-dir: fashion-mnist's names, which sort out of label order
    assert tool.main(["fashion-mnist", str(tmp_path / "f"), "--data-dir", str(tmp_path / "idx"), "-q"]) == 0
    assert "classes 0-T-shirt, 1-Trouser, 2-Pullover" in capsys.readouterr().out
    ds = datasets.load(str(tmp_path / "f"))
    assert ds.classes == ("0-T-shirt", "1-Trouser", "2-Pullover")
    assert np.array_equal(ds.train().labels, arrays["train-labels"])
    assert tool.folder_names(("0", "1", "2")) == ["0", "1", "2"]
    fashion = datasets.get_info("fashion-mnist").classes
    names = tool.folder_names(fashion)
    assert names[0] == "0-T-shirt" and names[9] == "9-Boot" and names == sorted(names)
    assert tool.folder_names(fashion, plain=True) == list(fashion)


def test_export_imagefolder_refuses_with_one_line_and_leaves_nothing(tmp_path, capsys):
    tool = _tool("export_imagefolder")
    _tiny_idx(tmp_path / "idx")
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "x").write_text("")
    for args, fragment in (
        ([str(tmp_path / "idx"), str(tmp_path / "taken")], "not an empty folder"),
        ([str(tmp_path / "nowhere"), str(tmp_path / "o")], "neither a known IDX data set"),
        (["cifar10", str(tmp_path / "o")], "not an IDX data set"),
    ):
        assert tool.main([*args, "-q"]) == 2
        err = capsys.readouterr().err
        assert err.startswith("error: ") and err.count("\n") == 1 and fragment in err, err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["idx", "taken"]


def test_make_colour_digits_colours_each_digit_apart_and_is_seeded(tmp_path, capsys):
    tool = _tool("make_colour_digits")
    arrays = _tiny_idx(tmp_path / "idx")
    a, b, c = tmp_path / "a.npz", tmp_path / "b.npz", tmp_path / "c.npz"
    assert tool.main([str(a), "--dataset", str(tmp_path / "idx"), "--min-distance", "200"]) == 0
    assert tool.main([str(b), "--dataset", str(tmp_path / "idx"), "--min-distance", "200"]) == 0
    assert tool.main([str(c), "--dataset", str(tmp_path / "idx"), "--seed", "1"]) == 0
    capsys.readouterr()
    with np.load(a) as za, np.load(b) as zb, np.load(c) as zc:
        assert za["x_train"].shape == (7, 6, 5, 3) and za["x_test"].dtype == np.uint8
        assert za["class_names"].tolist() == ["0", "1", "2"]
        assert np.array_equal(za["y_train"], arrays["train-labels"])
        assert np.array_equal(za["x_train"], zb["x_train"]) and not np.array_equal(
            za["x_train"], zc["x_train"]
        )
        for key, idx_key in (("x_train", "train-images"), ("x_test", "t10k-images")):
            x, grey = za[key].astype(np.int64), arrays[idx_key]
            for img, g in zip(x, grey, strict=True):
                ink, paper = img[g == 255], img[g == 0]
                # pure ink is the foreground, pure paper the background, and the two stand apart
                assert (ink == ink[0]).all() and (paper == paper[0]).all()
                assert np.linalg.norm(ink[0] - paper[0]) >= 200
    ds = datasets.load(str(a))  # capsctl reads it as an RGB set
    assert ds.train().images.shape == (7, 6, 5, 3) and ds.classes == ("0", "1", "2")
    assert (
        tool.main([str(tmp_path / "d.npz"), "--dataset", str(tmp_path / "idx"), "--min-distance", "999"]) == 2
    )
    assert "--min-distance" in capsys.readouterr().err and not (tmp_path / "d.npz").exists()


def test_make_colour_digits_black_background_colours_only_the_ink(tmp_path, capsys):
    tool = _tool("make_colour_digits")
    arrays = _tiny_idx(tmp_path / "idx")
    out = tmp_path / "k.npz"
    assert tool.main([str(out), "--dataset", str(tmp_path / "idx"), "--background", "black"]) == 0
    capsys.readouterr()
    with np.load(out) as z:
        x, grey = z["x_train"].astype(np.int64), arrays["train-images"]
        assert (x[grey == 0] == 0).all()  # every background pixel black
        inks = {tuple(img[g == 255][0]) for img, g in zip(x, grey, strict=True)}
        assert len(inks) > 1 and all(np.linalg.norm(ink) >= 150 for ink in inks)


def test_overlap_share_counts_the_fainter_digits_covered_ink():
    mm = _tool("multimnist_errors")
    parts = np.zeros((1, 2, 28, 28, 1), np.float32)
    parts[0, 0, 0:4, 0:4] = 1.0  # 16 ink pixels at (0, 0)
    parts[0, 1, 0:2, 0:8] = 1.0  # 16 ink pixels; placed at (2, 2): rows 2-3, cols 2-9
    offsets = np.array([[[0, 0], [2, 2]]])
    # the second covers rows 2-3, cols 2-3 of the first: 4 of 16
    assert mm.overlap_share(parts, offsets)[0] == pytest.approx(4 / 16)
    assert mm.overlap_share(parts, np.array([[[0, 0], [8, 8]]]))[0] == 0.0


@pytest.mark.torch
def test_multimnist_errors_splits_the_error_eval_pairs_reports(tmp_path, capsys, monkeypatch, mnist_dir):
    import json

    from capsctl.model.spec import ModelSpec
    from capsctl.model.weights import save_model

    from ._helpers import TINY, routing_weights, run_cli

    mm = _tool("multimnist_errors")
    spec = ModelSpec.from_dict(TINY)
    run = tmp_path / "run"
    run.mkdir()
    save_model(run / "model.safetensors", spec, routing_weights(spec))
    rows = [{"epoch": e, "test_accuracy": 0.1 * e, "test_images": 100, "images_per_s": 50.0,
             "seconds": 2.0, "compose": "overlap"} for e in (1, 2)]
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    code, out, err = run_cli(["eval-pairs", run / "model.safetensors", "--layout", "overlap",
                              "--data-dir", mnist_dir, "--json"], capsys)
    assert code == 0, err
    want = json.loads(out)
    argv = [str(run / "model.safetensors"), "--dataset", "mnist", "--data-dir", str(mnist_dir), "--json",
            str(tmp_path / "r.json")]
    monkeypatch.setattr(sys, "argv", ["multimnist_errors.py", *argv])
    mm.main()
    r = json.loads((tmp_path / "r.json").read_text())
    assert r["pairs"] == want["pairs"] and r["error"] == pytest.approx(1 - want["accuracy"])
    split = r["by_digits_missed_alone"]
    assert sum(v["pairs"] for v in split.values()) == r["pairs"]
    assert sum(v["share_of_all_errors"] for v in split.values()) == pytest.approx(1.0)
    assert sum(b["pairs"] for b in r["by_overlap"]) == r["pairs"]
    assert [(c["epoch"], c["composites"]) for c in r["curve"][str(run)]] == [(1, 100), (2, 200)]
    assert r["curve"][str(run)][1]["error"] == pytest.approx(0.8)


@pytest.mark.parametrize(("name", "argv", "words"), [
    ("composite_png", ["--index", "-1", "--out", "{d}/c.png"], "--index must be 0 or more"),
    ("composite_png", ["--out", "{d}/missing/c.png"], "does not exist"),
    ("composite_png", ["--out", "{d}/c.jpg"], "must end in .png"),
    ("composite_png", ["--layout", "diag", "--out", "{d}/c.png"], "--layout must be one of"),
    ("inspect_order", ["{d}/absent.safetensors"], "absent.safetensors: no such file"),
    ("inspect_order", ["{d}/absent.safetensors", "--batch-size", "0"], "--batch-size must be at least 1"),
    ("pair_errors", ["{d}/absent.safetensors"], "absent.safetensors: no such file"),
    ("multimnist_errors", ["{d}/absent.safetensors", "--json", "{d}/missing/e.json"], "does not exist"),
    ("multimnist_errors", ["{d}/absent.safetensors", "--runs", "{d}/nowhere"], "no metrics.jsonl there"),
])
def test_the_scripts_refuse_bad_input_in_one_line(tmp_path, capsys, monkeypatch, name, argv, words):
    from capsctl.errors import run_script

    tool = _tool(name)
    monkeypatch.setattr(sys, "argv", [name, *(a.format(d=tmp_path) for a in argv)])
    assert run_script(tool.main) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and words in err, err
    assert [p.name for p in tmp_path.iterdir()] == []  # nothing written


def test_composite_png_writes_the_composite_it_names(tmp_path, capsys, monkeypatch):
    from capsctl.errors import run_script

    monkeypatch.setattr(sys, "argv", ["composite_png", "--index", "3", "--out", str(tmp_path / "two.png")])
    assert run_script(_tool("composite_png").main) == 0
    assert capsys.readouterr().out == "labels: 4 8\n"  # (README's example)
    assert Image.open(tmp_path / "two.png").size == (28, 56)


def test_composite_png_merges_dark_ink_on_light_on_white(tmp_path, capsys, monkeypatch, mnist):
    """An overlap composite of light-background digits, as `eval-pairs --layout overlap` makes it for a
    model trained on them (a maximum of light images was blank paper)."""
    from capsctl.errors import run_script

    tr, te = mnist.train(), mnist.test()
    to8 = lambda x: np.round((1 - x[..., 0]) * 255).astype(np.uint8)  # noqa: E731
    np.savez(tmp_path / "paper.npz", x_train=to8(tr.images[:50]), y_train=tr.labels[:50],
             x_test=to8(te.images[:50]), y_test=te.labels[:50])
    monkeypatch.setattr(sys, "argv", ["composite_png", "--dataset", str(tmp_path / "paper.npz"), "--layout",
                                      "overlap", "--out", str(tmp_path / "o.png")])
    assert run_script(_tool("composite_png").main) == 0
    img = np.asarray(Image.open(tmp_path / "o.png"), np.float64) / 255
    assert img.shape == (36, 36) and img[0].min() > 0.9 and img.min() < 0.1  # white paper, dark ink

    # a colour set's composite stays in colour (it wrote the red channel as a gray image)
    rgb = lambda x: np.round(np.repeat(x, 3, axis=3) * [1.0, 0.5, 0.2] * 255).astype(np.uint8)  # noqa: E731
    np.savez(tmp_path / "colour.npz", x_train=rgb(tr.images[:50]), y_train=tr.labels[:50],
             x_test=rgb(te.images[:50]), y_test=te.labels[:50])
    monkeypatch.setattr(sys, "argv", ["composite_png", "--dataset", str(tmp_path / "colour.npz"), "--layout",
                                      "horizontal", "--out", str(tmp_path / "c.png")])
    assert run_script(_tool("composite_png").main) == 0
    with Image.open(tmp_path / "c.png") as im:
        assert im.mode == "RGB" and im.size == (56, 28)
        assert np.asarray(im)[..., 0].max() == 255 and np.asarray(im)[..., 2].max() == 51


def test_the_learning_curve_of_a_model_without_its_run_folder_is_empty(tmp_path):
    assert _tool("multimnist_errors").learning_curve(tmp_path) == []


@pytest.mark.parametrize("name", sorted(p.stem for p in TOOLS.glob("*.py")))
def test_every_tool_option_says_what_it_does(name, monkeypatch):
    """`python tools/X.py --help` explains each argument (most said nothing but its name)."""
    import argparse

    class Parsed(Exception):
        pass

    seen: list[argparse.ArgumentParser] = []

    def capture(self, *args, **kwargs):
        seen.append(self)
        raise Parsed

    monkeypatch.setattr(argparse.ArgumentParser, "parse_args", capture)
    monkeypatch.setattr(sys, "argv", [name])
    with pytest.raises(Parsed):
        _tool(name).main()
    (parser,) = seen
    silent = [a.dest for a in parser._actions if not a.help]
    assert silent == []


def test_make_shipped_model_refuses_an_unfinished_run(tmp_path, capsys, monkeypatch):
    """`--run` packaged whatever model.safetensors held: a run stopped at epoch 3 of 15 (its model file is
    rewritten every epoch) became the shipped model, its provenance saying 15 epochs."""
    from capsctl.errors import run_script
    from capsctl.model.spec import ModelSpec
    from capsctl.model.weights import init_weights, save_model
    from capsctl.training.config import TrainConfig
    from capsctl.training.recipes import get_recipe
    from capsctl.training.run_folder import MODEL_FILE, Checkpoint, save_checkpoint

    spec = ModelSpec()
    weights = init_weights(spec, 0)
    recipe = get_recipe("default")
    cfg = TrainConfig(dataset="mnist-5k", seed=0, recipe=recipe.name, **recipe.settings("capsule"))
    run = tmp_path / "run"
    run.mkdir()
    save_checkpoint(run, Checkpoint(spec, cfg, weights, {}, 3, 0, 1.0))
    save_model(run / MODEL_FILE, spec, weights)
    tool = _tool("make_shipped_model")
    # (where it would write, were the run taken: never the package's own model and docs)
    monkeypatch.setattr(tool, "SHIPPED_MODEL", tmp_path / "shipped.safetensors")
    monkeypatch.setattr(tool, "ROOT", tmp_path)
    (tmp_path / "docs").mkdir()
    monkeypatch.setattr(sys, "argv", ["make_shipped_model", "--run", str(run)])
    assert run_script(tool.main) == 2
    assert not (tmp_path / "shipped.safetensors").exists()
    err = capsys.readouterr().err
    assert err.startswith("error: ") and f"stopped at epoch 3 of {cfg.epochs}" in err, err


@pytest.mark.parametrize(("name", "argv", "words"), [
    ("composite_png", ["--seed", "-1", "--out", "{d}/c.png"], "--seed must be a whole number 0 or more"),
    ("composite_png", ["--digits", "11", "--out", "{d}/c.png"], "--digits 11: the images hold 10 classes"),
    ("pair_errors", ["{shipped}", "--seed", "-1"], "--seed must be a whole number 0 or more"),
])
def test_composite_seeds_and_digits_are_checked(tmp_path, capsys, monkeypatch, name, argv, words):
    """A negative --seed was numpy's ValueError traceback, and more digits than classes a concatenate
    error (or, in eval-pairs, "no composites to score")."""
    from capsctl.errors import run_script
    from capsctl.model.shipped import shipped_model

    tool = _tool(name)
    monkeypatch.setattr(sys, "argv", [name, *(a.format(d=tmp_path, shipped=shipped_model()) for a in argv)])
    assert run_script(tool.main) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and words in err, err


def test_multimnist_errors_takes_its_curve_from_pair_runs_only(tmp_path, capsys, monkeypatch):
    """A --runs folder of a single-digit run had its test accuracy reported as pair error."""
    import json

    from capsctl.errors import run_script
    from capsctl.model.shipped import shipped_model

    single = tmp_path / "single"
    single.mkdir()
    (single / "metrics.jsonl").write_text(json.dumps({"epoch": 1, "test_accuracy": 0.95, "test_images": 100,
                                                      "images_per_s": 10.0, "seconds": 1.0}) + "\n")
    tool = _tool("multimnist_errors")
    monkeypatch.setattr(sys, "argv", ["multimnist_errors", str(shipped_model()), "--runs", str(single)])
    assert run_script(tool.main) == 2
    assert "not a --compose overlap run" in capsys.readouterr().err


@pytest.mark.parametrize(("name", "argv", "words"), [
    ("predict_vs_eval", ["{d}", "--rounds", "0"], "--rounds must be at least 1, got 0"),
    ("predict_vs_eval", ["{d}", "--batch-size", "0"], "--batch-size must be at least 1"),
    ("eval_pairs_overhead", ["--rounds", "0"], "--rounds must be at least 1"),
    ("main_job", ["--repeats", "0"], "--repeats 0 only summarises earlier runs: give --runs FILE"),
    ("main_job", ["--repeats", "-1"], "--repeats must be at least 0"),
    ("main_job", ["--json", "{d}/missing/o.json"], "does not exist"),
    ("distributed_throughput", ["--json", "{d}"], "not a regular file"),
    ("torch_ab", ["--steps", "0"], "--steps must be at least 1"),
    ("conv_layers", ["--frameworks", "torhc"], "torhc is not torch or tensorflow"),
    ("conv_layers", ["--json", "{d}"], "not a regular file"),
    ("distributed_throughput", ["--nproc", "1"], "--nproc must be at least 2"),
])
def test_the_bench_scripts_refuse_bad_counts_in_one_line(tmp_path, capsys, monkeypatch, name, argv, words):
    """`--rounds 0` was a StatisticsError traceback after the work, `--batch-size 0` a loop that never ended,
    a misspelled framework ran TensorFlow and was reported as it."""
    from capsctl.errors import run_script

    spec = importlib.util.spec_from_file_location(f"_bench_{name}", TOOLS.parent / "bench" / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    monkeypatch.setattr(sys, "argv", [name, *(a.format(d=tmp_path) for a in argv)])
    assert run_script(module.main) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and words in err, err
