"""`capsctl predict` end to end with a tiny trained model: table, --json, --csv, stdin, folders searched
recursively, an unreadable file among good ones, an empty folder, and --threshold on a real composite."""

from __future__ import annotations

import csv
import io
import json
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from ._helpers import TINY, assert_one_line_error, run_cli


def _png(path: Path, img: np.ndarray) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray((np.asarray(img)[..., 0] * 255).round().astype(np.uint8)).save(path)
    return path


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory: pytest.TempPathFactory, mnist_dir: Path) -> Path:
    """A tiny capsule model trained for one epoch on 256 real digits (seconds)."""
    from capsctl.cli import main

    d = tmp_path_factory.mktemp("predict-model")
    (d / "tiny.json").write_text(json.dumps(TINY))
    with pytest.raises(SystemExit) as info:
        main(["train", "--spec", str(d / "tiny.json"), "--data-dir", str(mnist_dir), "--limit", "256",
              "--epochs", "1", "--batch-size", "64", "--eval-limit", "64", "-q", "--out", str(d / "run")])
    assert info.value.code in (0, None)
    return d / "run" / "model.safetensors"


@pytest.fixture(scope="module")
def digits_dir(tmp_path_factory: pytest.TempPathFactory, mnist) -> Path:
    """Six real test digits as PNGs: three at the top, two in a sub-folder, one in a sub-sub-folder,
    and a README that is not an image."""
    d = tmp_path_factory.mktemp("digits")
    x = mnist.test().images
    for i, rel in enumerate(["a.png", "b.png", "c.png", "sub/d.png", "sub/e.png", "sub/deeper/f.png"]):
        _png(d / rel, x[i])
    (d / "README.txt").write_text("not an image")
    return d


def _lines(out: str) -> list[dict]:
    return [json.loads(line) for line in out.splitlines()]


@pytest.mark.torch
def test_json_csv_and_table_on_a_folder_searched_recursively(tiny_model, digits_dir, capsys):
    code, out, err = run_cli(["predict", tiny_model, digits_dir, "--json", "--top", "2"], capsys)
    assert code == 0, err
    rows = _lines(out)
    names = [Path(r["image"]).relative_to(digits_dir).as_posix() for r in rows]
    assert names == ["a.png", "b.png", "c.png", "sub/d.png", "sub/deeper/f.png", "sub/e.png"]
    for r in rows:
        assert len(r["top"]) == 2 and r["top"][0]["score"] >= r["top"][1]["score"]
        assert r["top"][0]["class"] == str(r["top"][0]["index"])
        over = [t["class"] for t in r["top"] if t["score"] > 0.5]
        assert r["present"][: len(over)] == over
    assert "6 image(s) predicted" in err and "1 non-image file(s)" in err

    code, out, err = run_cli(["predict", tiny_model, digits_dir, "--csv"], capsys)
    assert code == 0, err
    table = list(csv.reader(io.StringIO(out)))
    assert table[0] == ["image", "top1", "score1", "top2", "score2", "top3", "score3", "present", "error"]
    assert len(table) == 7 and all(row[-1] == "" for row in table[1:])
    by_image = {r["image"]: r for r in rows}
    for row in table[1:]:
        assert row[1] == by_image[row[0]]["top"][0]["class"]
        assert float(row[2]) == pytest.approx(by_image[row[0]]["top"][0]["score"], abs=1e-5)

    code, out, err = run_cli(["predict", tiny_model, digits_dir / "a.png", digits_dir / "sub"], capsys)
    assert code == 0, err
    assert "a.png" in out and "d.png" in out and "f.png" in out and "top (class score)" in out
    assert "error" not in out


@pytest.mark.torch
def test_paths_from_stdin(tiny_model, digits_dir, capsys, monkeypatch):
    listing = f"{digits_dir / 'b.png'}\n\n{digits_dir / 'sub' / 'e.png'}\n"
    monkeypatch.setattr(sys, "stdin", io.StringIO(listing))
    code, out, err = run_cli(["predict", tiny_model, "-", digits_dir / "a.png", "--json"], capsys)
    assert code == 0, err
    assert [Path(r["image"]).name for r in _lines(out)] == ["b.png", "e.png", "a.png"]


@pytest.mark.torch
def test_a_path_on_stdin_that_is_not_utf8_is_a_file_name_not_a_traceback(tiny_model, digits_dir, capsys,
                                                                          monkeypatch):
    listing = f"{digits_dir / 'b.png'}\n".encode() + b"/nowhere/\xff\xfe.png\n"
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(listing), encoding="utf-8"))
    code, out, err = run_cli(["predict", tiny_model, "-", "--json"], capsys)
    rows = _lines(out)
    assert code == 2 and "Traceback" not in err, err
    assert Path(rows[0]["image"]).name == "b.png" and "error" not in rows[0]
    assert rows[1]["image"].startswith("/nowhere/") and "error" in rows[1]
    # the table and CSV show such a name's bytes as \xNN: a terminal or file that takes strict UTF-8 takes it
    from capsctl._console import shown as _shown

    assert _shown("/nowhere/\udcff\udcfe.png") == "/nowhere/\\xff\\xfe.png" and _shown("a.png") == "a.png"


@pytest.mark.torch
def test_an_unreadable_file_is_reported_and_the_others_still_predicted(tiny_model, digits_dir, tmp_path,
                                                                      capsys):
    (tmp_path / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"junk" * 10)
    (tmp_path / "empty.jpg").write_bytes(b"")
    good = [digits_dir / "a.png", digits_dir / "sub" / "d.png"]
    args = ["predict", tiny_model, good[0], tmp_path / "broken.png", tmp_path / "missing.png", good[1],
            tmp_path / "empty.jpg"]
    code, out, err = run_cli([*args, "--json"], capsys)
    assert code == 2
    rows = _lines(out)
    names = ["a.png", "broken.png", "missing.png", "d.png", "empty.jpg"]
    assert [Path(r["image"]).name for r in rows] == names
    assert "top" in rows[0] and "top" in rows[3]
    assert "error" in rows[1] and rows[2]["error"] == "no such file" and rows[4]["error"] == "empty file"
    assert "2 image(s) predicted, 3 could not be read or did not fit the model" in err
    assert "Traceback" not in err

    code, out, _ = run_cli([*args, "--csv"], capsys)
    assert code == 2
    table = list(csv.reader(io.StringIO(out)))
    assert [bool(row[-1]) for row in table[1:]] == [False, True, True, False, True]

    code, out, _ = run_cli(args, capsys)
    assert code == 2 and "no such file" in out and "error" in out


@pytest.mark.torch
def test_empty_folder_and_bad_options_are_one_line_errors(tiny_model, tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    code, out, err = run_cli(["predict", tiny_model, tmp_path / "empty"], capsys)
    assert_one_line_error(code, out, err, "no images in this folder")
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "notes.txt").write_text("x")
    code, out, err = run_cli(["predict", tiny_model, tmp_path / "docs"], capsys)
    assert_one_line_error(code, out, err, "no images", "1 other file")
    # beside other inputs, a folder without an image is one row, as an unreadable file is: the rest is
    # still predicted and the exit code is 2 at the end (it stopped the whole run)
    png = _png(tmp_path / "x.png", np.zeros((28, 28, 1), np.float32))
    code, out, err = run_cli(["predict", tiny_model, png, tmp_path / "empty", "--json"], capsys)
    rows = _lines(out)
    assert code == 2 and [r["image"] for r in rows] == [str(png), str(tmp_path / "empty")]
    assert "scores" not in rows[1] and "no images in this folder" in rows[1]["error"]
    assert "top" in rows[0] and "1 image(s) predicted, 1 could not be read" in err
    for extra, fragment in [(["--json", "--csv"], "--json and --csv"), (["--top", "11"], "--top"),
                            (["--threshold", "1.5"], "--threshold"), (["--resize", "0x5"], "--resize"),
                            (["--fit"], "--fit scales to fit")]:
        code, out, err = run_cli(["predict", tiny_model, png, *extra], capsys)
        assert_one_line_error(code, out, err, fragment)


@pytest.mark.torch
def test_resize_fit_reads_an_image_as_a_training_folder_with_image_size(tiny_model, mnist, tmp_path, capsys):
    from capsctl.data.images import load_image

    tall = np.repeat(mnist.test().images[0], 2, axis=0)  # 56x28: stretched to 28x28 it is a fat digit
    png = _png(tmp_path / "tall.png", tall)
    fitted = load_image(png, resize=(28, 28), fit=True)
    assert fitted[:, :7].max() == 0 and fitted[:, 21:].max() == 0
    np.save(tmp_path / "fitted.npy", fitted)
    rows = []
    for args in ([png, "--resize", "28x28", "--fit"], [tmp_path / "fitted.npy"], [png, "--resize", "28x28"]):
        code, out, err = run_cli(["predict", tiny_model, *args, "--json", "--top", "10"], capsys)
        assert code == 0, err
        rows.append({c["class"]: c["score"] for c in _lines(out)[0]["top"]})
    assert rows[0] == pytest.approx(rows[1], abs=1e-5)
    assert rows[2] != pytest.approx(rows[0], abs=1e-3)


@pytest.mark.parametrize("backend_name", [pytest.param("torch", marks=pytest.mark.torch),
                                          pytest.param("keras", marks=pytest.mark.keras)])
def test_threshold_on_a_real_two_digit_composite(tiny_model, mnist, tmp_path, capsys, backend_name):
    """The PNG of a real vertical pair gives the scores the model gives the pair in memory, and
    'present' is exactly the classes over --threshold, highest first."""
    from capsctl.backend import get_backend
    from capsctl.data.composites import make_composites
    from capsctl.model.weights import load_model

    test = mnist.test()
    comp = make_composites(test.images[:50], test.labels[:50], digits=2, layout="vertical", seed=0, limit=2)
    paths = [_png(tmp_path / f"pair{i}.png", comp.images[i]) for i in range(2)]
    spec, weights = load_model(tiny_model)
    expected = get_backend(backend_name).runner(spec, weights).scores(comp.images[:2])
    for threshold in ("0.5", "0.1", "0.0"):
        code, out, err = run_cli(["predict", tiny_model, *paths, "--json", "--top", "10",
                                  "--threshold", threshold, "--backend", backend_name], capsys)
        assert code == 0, err
        for row, scores in zip(_lines(out), expected, strict=True):
            got = {t["index"]: t["score"] for t in row["top"]}
            np.testing.assert_allclose([got[j] for j in range(10)], scores, atol=1e-5)
            want = [str(j) for j in np.argsort(-scores, kind="stable") if scores[j] > float(threshold)]
            assert row["present"] == want
    assert len(want) == 10  # threshold 0: every class is present


@pytest.mark.torch
def test_a_two_class_model_lists_its_two_classes_by_default(tmp_path, capsys):
    """--top defaults to 3, or to the class count of a model with fewer (a 2-class model was refused)."""
    from capsctl.model.spec import ModelSpec
    from capsctl.model.weights import init_weights, save_model

    spec = ModelSpec.from_dict({**TINY, "num_classes": 2, "class_names": ["cat", "dog"]})
    model = tmp_path / "two.safetensors"
    save_model(model, spec, init_weights(spec, 0))
    png = _png(tmp_path / "x.png", np.zeros((28, 28, 1), np.float32))
    code, out, err = run_cli(["predict", model, png, "--json"], capsys)
    assert code == 0, err
    (row,) = _lines(out)
    assert sorted(t["class"] for t in row["top"]) == ["cat", "dog"]
    code, out, err = run_cli(["predict", model, png, "--top", "3"], capsys)
    assert_one_line_error(code, out, err, "--top must be in 1..2, got 3")


def test_an_export_or_an_upper_case_suffix_as_model_is_not_taken_for_an_image(tiny_model, tmp_path, capsys):
    """`predict caps.onnx x.png` scored x.png with the shipped model (caps.onnx was read as an image);
    `MODEL.SAFETENSORS` too."""
    import shutil

    png = _png(tmp_path / "x.png", np.zeros((28, 28, 1), np.float32))
    for name in ("caps.onnx", "caps.pt", "caps.keras"):
        (tmp_path / name).write_bytes(b"PK\x03\x04")
        code, out, err = run_cli(["predict", tmp_path / name, png, "--json"], capsys)
        assert_one_line_error(code, out, err, name, "an export", "capsctl import")
    upper = tmp_path / "MODEL.SAFETENSORS"
    shutil.copy(tiny_model, upper)
    code, out, err = run_cli(["predict", upper, png, "--json"], capsys)
    assert code == 0, err
    code, again, err = run_cli(["predict", tiny_model, png, "--json"], capsys)
    assert json.loads(out)["top"] == json.loads(again)["top"]


def test_collecting_paths_keeps_spaces_in_names_and_leaves_pipes_in_folders_out(tmp_path):
    """Paths on stdin lost their leading and trailing spaces (' lead.png' was reported missing, or another
    file predicted); a named pipe with an image suffix inside a folder was opened and hung predict."""
    import os

    from capsctl.cli._predict import collect_paths

    listing = io.StringIO(" lead.png\ntrail.png \r\n\n   \nplain.png\n")
    paths, _ = collect_paths(["-"], listing)
    assert [str(p) for p in paths] == [" lead.png", "trail.png ", "plain.png"]
    folder = tmp_path / "f"
    folder.mkdir()
    Image.fromarray(np.zeros((28, 28), np.uint8)).save(folder / "a.png")
    os.mkfifo(folder / "b.png")
    (folder / "c.png").symlink_to(tmp_path / "gone.png")  # a dangling link stays: its row says so
    paths, skipped = collect_paths([str(folder)], None)
    assert paths == [folder / "a.png", folder / "c.png"] and skipped == 1


def test_a_nan_threshold_is_refused(capsys):
    """`--threshold nan` passed the range check (NaN compares false) and marked no class present."""
    code, out, err = run_cli(["predict", "x.png", "--threshold", "nan"], capsys)
    assert_one_line_error(code, out, err, "--threshold", "must be a number")


def test_an_oversized_resize_is_refused_once_before_anything_is_read(tmp_path, capsys):
    """`--resize 5000x5000` passed the option check and failed on every image: one error row each."""
    for name in ("a.png", "b.png"):
        Image.fromarray(np.zeros((28, 28), np.uint8)).save(tmp_path / name)
    code, out, err = run_cli(["predict", tmp_path, "--resize", "5000x5000"], capsys)
    assert_one_line_error(code, out, err, "--resize 5000x5000", "at most 16777216 pixels")
    code, out, err = run_cli(["predict", tmp_path, "--resize", "70000x1"], capsys)
    assert_one_line_error(code, out, err, "--resize 70000x1", "each side must be 1..65535")


def test_big_images_are_read_and_scored_in_chunks_bounded_by_pixels(tmp_path, monkeypatch):
    """512 images were read at a time and each size group scored in one call of --batch-size images,
    whatever their size: a folder of 12-megapixel photos was 24 GB of pixels before the first forward."""
    from capsctl.cli import _predict
    from capsctl.model.spec import ModelSpec

    monkeypatch.setattr(_predict, "READ_PIXELS", 3 * 28 * 28)  # a chunk: 3 small images, or 2 tall ones
    monkeypatch.setattr(_predict, "FORWARD_PIXELS", 2 * 28 * 28)  # a forward: 2 small images, 1 tall one
    sizes = [(28, 28)] * 4 + [(56, 28)] * 3
    paths = []
    for k, (h, w) in enumerate(sizes):
        ink = np.zeros((h, w), np.uint8)
        ink[4:20, 10:14] = 255
        paths.append(tmp_path / f"{k}.png")
        Image.fromarray(ink).save(paths[-1])
    paths.insert(2, tmp_path / "missing.png")
    calls = []

    def scores(batch, per_call):
        calls.append((batch.shape[0], batch.shape[1], per_call))
        return np.full((batch.shape[0], 10), float(batch.shape[1]))

    results = list(_predict.run_predictions(paths, scores, ModelSpec(), batch_size=512))
    assert [r["image"] for r in results] == [str(p) for p in paths]
    assert "error" in results[2] and all("scores" in r for k, r in enumerate(results) if k != 2)
    assert [r["scores"][0] for r in results if "scores" in r] == [28.0] * 4 + [56.0] * 3
    # chunks: 0, 1, missing, 2 | 3, t4 | t5, t6 (each stops at 3 small images' pixels)
    assert calls == [(3, 28, 2), (1, 28, 2), (1, 56, 1), (2, 56, 1)]


@pytest.mark.torch
def test_an_unreadable_subfolder_is_a_row_not_a_silent_gap(tiny_model, tmp_path, capsys, monkeypatch):
    """rglob passes over a folder it cannot list without a word: its images vanished from the output and
    the summary said every image was predicted (exit 0)."""
    import os

    for sub in ("a", "b"):
        (tmp_path / "nest" / sub).mkdir(parents=True)
        for k in range(2):
            Image.fromarray(np.zeros((28, 28), np.uint8)).save(tmp_path / "nest" / sub / f"{k}.png")
    locked = str(tmp_path / "nest" / "b")
    real_scandir = os.scandir

    def scandir(path="."):
        if os.fspath(path) == locked:  # (as a folder without read permission; root is never refused)
            raise PermissionError(13, "Permission denied", locked)
        return real_scandir(path)

    monkeypatch.setattr(os, "scandir", scandir)
    code, out, err = run_cli(["predict", tiny_model, tmp_path / "nest", "--json"], capsys)
    rows = _lines(out)
    assert code == 2, err
    assert [Path(r["image"]).name for r in rows] == ["0.png", "1.png", "b"]
    assert rows[2]["error"] == "cannot read this folder (Permission denied)"
    assert "2 image(s) predicted, 1 could not be read" in " ".join(err.split())
