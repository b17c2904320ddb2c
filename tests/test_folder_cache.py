"""ImageFolder data sets: the decoded-folder cache (`data list`, `data forget`), folders without test/
(--holdout / --val-fraction) and the sample order (by file name across classes, as an exported IDX set)."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from capsctl.data import _folder_cache, datasets, folders
from capsctl.data.folders import load_image_folder
from capsctl.data.sources import held_out, load_path
from capsctl.errors import CapsctlError

from ._helpers import TINY, assert_one_line_error, run_cli, write_set

CLASSES = ("ant", "bee", "cow")


@pytest.fixture(autouse=True)
def _own_cache(tmp_path, monkeypatch):
    # one cache per test: entries of other tests never count here
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))


def _export(root: Path, split: str, images: np.ndarray, labels: np.ndarray, name: str = "{:05d}.png") -> None:
    """An IDX-like array as ROOT/SPLIT/<class>/<index>.png (what tools/ exporters write)."""
    for i, (img, y) in enumerate(zip(images, labels, strict=True)):
        d = root / split / CLASSES[y]
        d.mkdir(parents=True, exist_ok=True)
        Image.fromarray(img).save(d / name.format(i))


def _arrays(n: int, seed: int = 0, size: int = 8) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, len(CLASSES), n)
    labels[: len(CLASSES)] = np.arange(len(CLASSES))  # every class present
    return rng.integers(0, 256, (n, size, size), dtype=np.uint8), labels.astype(np.int64)


def _set(root: Path, n_train: int = 30, n_test: int | None = 9) -> Path:
    _export(root, "train", *_arrays(n_train))
    if n_test is not None:
        _export(root, "test", *_arrays(n_test, seed=1))
    return root


# -- sample order ------------------------------------------------------------------------------------------


def test_an_exported_idx_set_loads_in_its_original_order(tmp_path):
    x, y = _arrays(40)
    xt, yt = _arrays(12, seed=1)
    idx_dir = tmp_path / "idx"
    write_set(idx_dir, {"train-images": x, "train-labels": y, "t10k-images": xt, "t10k-labels": yt})
    root = tmp_path / "png"
    _export(root, "train", x, y)
    _export(root, "test", xt, yt)
    (train, y_train), test, classes = load_image_folder(root)
    assert test is not None and classes == CLASSES
    np.testing.assert_array_equal(train[..., 0], x.astype(np.float32) / 255)
    assert y_train.tolist() == y.tolist() and test[1].tolist() == yt.tolist()
    # exactly what the IDX path gives: the same seed then draws the same batches
    ref = load_path(str(idx_dir))
    np.testing.assert_array_equal(train, ref.train().images)
    np.testing.assert_array_equal(test[0], ref.test().images)
    np.testing.assert_array_equal(y_train, ref.train().labels)


def test_digits_in_names_sort_as_numbers(tmp_path):
    x, y = _arrays(12)
    _export(tmp_path / "ds", "train", x, y, name="img{}.png")  # img2 before img10, unpadded
    (train, labels), test, _ = load_image_folder(tmp_path / "ds")
    assert test is None
    np.testing.assert_array_equal(train[..., 0], x.astype(np.float32) / 255)
    assert labels.tolist() == y.tolist()
    assert folders.natural_key("a2.png") < folders.natural_key("a10.png")


# -- the cache -----------------------------------------------------------------------------------------------


def _entries() -> list[_folder_cache.Entry]:
    return _folder_cache.entries()


def test_second_load_is_a_memory_mapped_cache_hit_opening_no_image(tmp_path, monkeypatch):
    root = _set(tmp_path / "ds")
    first = load_image_folder(root)
    (entry,) = _entries()
    m = entry.manifest
    assert m["source"] == str(root.resolve()) and m["classes"] == list(CLASSES)
    assert (m["train_images"], m["test_images"], m["shape"]) == (30, 9, [8, 8, 1])
    assert {p.name for p in entry.folder.iterdir()} == {
        "manifest.json", "train-images.npy", "train-labels.npy", "test-images.npy", "test-labels.npy"
    }
    assert not [p for p in entry.folder.parent.iterdir() if p.name.startswith(".")]  # no temporary left

    def no_open(*a, **k):
        raise AssertionError("an image was opened on a cache hit")

    monkeypatch.setattr(folders, "_open", no_open)
    monkeypatch.setattr("PIL.Image.open", no_open)
    loads = []
    real_load = np.load

    def spy_load(*a, **k):
        loads.append(k.get("mmap_mode"))
        return real_load(*a, **k)

    monkeypatch.setattr(np, "load", spy_load)
    second = load_image_folder(root)
    assert loads == ["r"] * 4
    assert first[1] is not None and second[1] is not None
    for a, b in zip((*first[0], *first[1]), (*second[0], *second[1]), strict=True):
        np.testing.assert_array_equal(a, b)
        assert a.dtype == b.dtype
    assert second[2] == CLASSES


def test_a_changed_file_or_request_is_decoded_again(tmp_path):
    root = _set(tmp_path / "ds")
    load_image_folder(root)
    (old,) = _entries()
    f = next((root / "train").rglob("00001.png"))
    st = f.stat()
    os.utime(f, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000_000))  # touched: same bytes, new mtime
    load_image_folder(root)
    (new,) = _entries()  # re-decoded under a new key; the stale entry is pruned
    assert new.key != old.key and not old.folder.exists()
    # new content of another size
    Image.fromarray(np.full((8, 8), 7, np.uint8)).save(f)
    (train, _), _, _ = load_image_folder(root)
    assert train[1].max() == pytest.approx(7 / 255)
    # a different --image-size is another entry beside it
    load_image_folder(root, (12, 12))
    assert sorted(e.manifest["image_size"] is None for e in _entries()) == [False, True]


def test_a_chmod_or_a_copy_that_keeps_times_still_hits_the_cache(tmp_path, monkeypatch):
    import shutil

    root = _set(tmp_path / "ds")
    load_image_folder(root)
    (entry,) = _entries()
    f = next((root / "train").rglob("00001.png"))
    f.chmod(0o600)  # the ctime moves, the content does not
    shutil.copy2(f, f.with_suffix(".tmp"))
    os.replace(f.with_suffix(".tmp"), f)  # rewritten in place with its times kept (rsync -a, cp -p)
    monkeypatch.setattr(folders, "_header", lambda *a: pytest.fail("decoded again"))
    load_image_folder(root)
    assert [e.key for e in _entries()] == [entry.key]


def test_an_entry_whose_classes_were_edited_is_decoded_again(tmp_path):
    root = _set(tmp_path / "ds")
    load_image_folder(root)
    (entry,) = _entries()
    m = json.loads((entry.folder / "manifest.json").read_text())
    (entry.folder / "manifest.json").write_text(json.dumps({**m, "classes": ["cat", "dog", "eel"]}))
    _, _, classes = load_image_folder(root)
    assert classes == CLASSES


@pytest.mark.parametrize("damage", ["header", "labels out of range"])
def test_an_entry_numpy_cannot_parse_or_with_impossible_labels_is_decoded_again(tmp_path, damage):
    root = _set(tmp_path / "ds")
    load_image_folder(root)
    (entry,) = _entries()
    if damage == "header":  # numpy's header parser raises tokenize.TokenError on this
        data = bytearray((entry.folder / "test-images.npy").read_bytes())
        data[data.index(b"}")] = ord("(")
        (entry.folder / "test-images.npy").write_bytes(bytes(data))
    else:
        labels = np.load(entry.folder / "train-labels.npy")
        labels[0] = 99
        np.save(entry.folder / "train-labels.npy", labels)
    (train, test), _, _ = load_image_folder(root)
    assert train.shape == (30, 8, 8, 1) and test is not None and int(train[1].max()) < len(CLASSES)
    (fresh,) = _entries()
    assert int(np.load(fresh.folder / "train-labels.npy").max()) < len(CLASSES)


def test_entries_of_an_older_format_are_pruned_and_a_newer_ones_kept(tmp_path):
    root = _set(tmp_path / "ds")
    load_image_folder(root)
    base = _folder_cache.root()
    fmt_now = _folder_cache.FORMAT
    for name, fmt in (("0123456789abcdef", fmt_now - 1), ("fedcba9876543210", fmt_now + 1)):
        (base / name).mkdir()
        (base / name / "manifest.json").write_text(json.dumps({"format": fmt}))
    (base / "00000000deadbeef").mkdir()  # no manifest at all: damaged
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(root / "train" / "ant" / "new.png")
    load_image_folder(root)  # a new entry is written: the sweep runs
    assert sorted(d.name for d in base.iterdir() if not d.name.startswith(".")) == sorted(
        ["fedcba9876543210", *(e.key for e in _entries())])


def test_hidden_folders_are_not_classes(tmp_path):
    root = _set(tmp_path / "ds")
    for split in ("train", "test"):
        (root / split / ".ipynb_checkpoints").mkdir()
    _, _, classes = load_image_folder(root)
    assert classes == CLASSES


def test_a_damaged_entry_is_decoded_again(tmp_path):
    root = _set(tmp_path / "ds")
    load_image_folder(root)
    (entry,) = _entries()
    (entry.folder / "train-images.npy").write_bytes(b"garbage")
    (train, _), _, _ = load_image_folder(root)
    assert train.shape == (30, 8, 8, 1)
    (entry,) = _entries()
    assert np.load(entry.folder / "train-images.npy").shape == (30, 8, 8, 1)


@pytest.mark.parametrize("edit", [lambda m: m.pop("shape"), lambda m: m.update(classes=None),
                                  lambda m: m.update(train_images="30"), lambda m: m.update(notes=5),
                                  lambda m: m.update(notes="hi")])
def test_a_hand_edited_manifest_is_decoded_again_and_left_out_of_data_list(tmp_path, capsys, edit):
    root = _set(tmp_path / "ds")
    load_image_folder(root)
    (entry,) = _entries()
    m = json.loads((entry.folder / "manifest.json").read_text())
    edit(m)
    (entry.folder / "manifest.json").write_text(json.dumps(m))
    assert _entries() == []
    code, out, err = run_cli(["data", "list", "--json"], capsys)
    assert code == 0, err
    assert json.loads(out)["user_sets"] == []
    (train, _), _, _ = load_image_folder(root)
    assert train.shape == (30, 8, 8, 1) and len(_entries()) == 1


def test_an_interrupted_write_leaves_no_entry(tmp_path, monkeypatch, capsys):
    root = _set(tmp_path / "ds")

    def full_disk(*a, **k):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(_folder_cache, "atomic_write_bytes", full_disk)
    (train, _), _, _ = load_image_folder(root)  # the data is still loaded
    assert train.shape == (30, 8, 8, 1)
    assert "could not cache" in capsys.readouterr().err
    assert _entries() == [] and list(_folder_cache.root().iterdir()) == []


def test_data_list_shows_and_forget_removes_cached_sets(tmp_path, capsys):
    root = _set(tmp_path / "ds")
    load_image_folder(root)
    load_image_folder(_set(tmp_path / "other", n_train=6, n_test=None))
    code, out, err = run_cli(["data", "list", "--json"], capsys)
    assert code == 0, err
    rows = {r["source"]: r for r in json.loads(out)["user_sets"]}
    row = rows[str(root.resolve())]
    assert (row["train_images"], row["test_images"], row["shape"]) == (30, 9, [8, 8, 1]) and row["bytes"] > 0
    code, out, err = run_cli(["data", "list"], capsys)
    assert code == 0 and "cached user sets" in out and row["key"] in out and "8x8x1" in out
    code, out, err = run_cli(["data", "forget", row["key"][:3]], capsys)  # too short a start: said so
    assert_one_line_error(code, out, err, "give at least 4 characters of the key")
    code, out, err = run_cli(["data", "forget", row["key"]], capsys)
    assert code == 0 and row["key"] in out
    assert [e.source for e in _entries()] == [str((tmp_path / "other").resolve())]
    code, out, err = run_cli(["data", "forget", str(tmp_path / "other")], capsys)  # by path
    assert code == 0 and _entries() == []
    code, out, err = run_cli(["data", "forget", "0123456789abcdef"], capsys)
    assert_one_line_error(code, out, err, "0123456789abcdef", "no cached user set")


# -- no test/: --holdout or --val-fraction ------------------------------------------------------------------


def test_a_folder_without_test_needs_holdout_or_val_fraction(tmp_path):
    ds = load_path(str(_set(tmp_path / "ds", n_test=None)))
    assert len(ds.train().images) == 30
    with pytest.raises(CapsctlError, match=r"no test/ folder; give --holdout N or --val-fraction F"):
        ds.test()
    rest, held = held_out(ds.train(), None, 0.2)
    assert (len(rest.images), len(held.images)) == (24, 6)
    rest2, held2 = held_out(ds.train(), 6, None)  # the same fixed draw
    np.testing.assert_array_equal(held.images, held2.images)
    np.testing.assert_array_equal(rest.labels, rest2.labels)
    ref_rest, _ = datasets.hold_out(ds.train(), 6)
    np.testing.assert_array_equal(rest.images, ref_rest.images)
    for args, fragment in (((6, 0.2), "not both"), ((None, 1.0), "--val-fraction must be between 0 and 1"),
                           ((None, 0.001), "holds out 0")):
        with pytest.raises(CapsctlError, match=fragment):
            held_out(ds.train(), *args)


@pytest.mark.torch
def test_train_on_a_folder_without_test(tmp_path, capsys):
    root = _set(tmp_path / "ds", n_test=None)
    (tmp_path / "tiny.json").write_text(json.dumps(TINY))
    base = ["train", "--spec", tmp_path / "tiny.json", "--dataset", root, "--epochs", "1",
            "--batch-size", "8", "-q", "--json"]
    code, out, err = run_cli([*base, "--out", tmp_path / "a"], capsys)
    assert_one_line_error(code, out, err, "no test/ folder", "--holdout N", "--val-fraction F")
    assert not (tmp_path / "a").exists()
    both = ["--holdout", "5", "--val-fraction", "0.2"]
    code, out, err = run_cli([*base, *both, "--out", tmp_path / "b"], capsys)
    assert_one_line_error(code, out, err, "not both")
    code, out, err = run_cli([*base, "--val-fraction", "1.5", "--out", tmp_path / "b"], capsys)
    assert_one_line_error(code, out, err, "--val-fraction must be between 0 and 1")
    assert not (tmp_path / "b").exists()
    code, out, err = run_cli([*base, "--val-fraction", "0.2", "--out", tmp_path / "c"], capsys)
    assert code == 0, err
    assert 0 <= json.loads(out)["test_accuracy"] <= 1
    from capsctl.training.run_folder import load_checkpoint

    assert load_checkpoint(tmp_path / "c").config.val_fraction == 0.2
    code, out, err = run_cli(["train", "--resume", tmp_path / "c", "--json"], capsys)  # keeps the split
    assert code == 0, err
    # without --json the last line suggests eval-pairs on the same held-out images (it was predict on train/,
    # the training images themselves)
    code, out, err = run_cli([*base[:-1], "--val-fraction", "0.2", "--out", tmp_path / "d"], capsys)
    assert code == 0, err
    assert out.strip().splitlines()[-1].startswith("next: capsctl eval-pairs ")
    assert out.strip().endswith("--val-fraction 0.2")
    import shlex

    code, out, err = run_cli(shlex.split(out.strip().splitlines()[-1])[2:], capsys)  # it runs as printed
    assert code == 0, err
    # eval and eval-pairs score the same held-out images: the training run's last test accuracy comes back
    model = tmp_path / "c" / "model.safetensors"
    code, out, err = run_cli(["eval", model, "--dataset", root, "--val-fraction", "0.2", "--json"], capsys)
    assert code == 0, err
    last = json.loads((tmp_path / "c" / "metrics.jsonl").read_text().splitlines()[-1])
    assert json.loads(out)["images"] == 6 and json.loads(out)["accuracy"] == last["test_accuracy"]
    # and say so: the JSON told a held-out score from a test score by nothing
    assert json.loads(out)["split"] == "held-out" and json.loads(out)["val_fraction"] == 0.2
    code, out, err = run_cli(["eval", model, "--dataset", root, "--json"], capsys)
    assert_one_line_error(code, out, err, "no test/ folder", "--holdout N", "eval")
    code, out, err = run_cli(["eval-pairs", model, "--dataset", root, "--holdout", "6", "--json"], capsys)
    assert code == 0, err
    got = json.loads(out)
    assert (got["split"], got["holdout"], got["dataset"]) == ("held-out", 6, str(root)) and "backend" in got
    # a file added since: the draw holds out other images, many of them trained on; refused, not scored
    first = sorted((root / "train").rglob("*.png"))[0]
    shutil.copy(first, first.with_name("added-since.png"))
    code, out, err = run_cli(["eval", model, "--dataset", root, "--val-fraction", "0.2", "--json"], capsys)
    assert_one_line_error(code, out, err, "trained beside a hold-out that left 24 training images, but",
                          "now leaves 25", "the data changed since")


def test_experiment_pairs_on_a_folder_without_test_refuses_without_a_split(tmp_path, capsys):
    root = _set(tmp_path / "ds", n_test=None)
    code, out, err = run_cli(["experiment", "pairs", "--dataset", root, "--out", tmp_path / "o",
                              "--holdout", "5", "--val-fraction", "0.2"], capsys)
    assert_one_line_error(code, out, err, "not both")
    code, out, err = run_cli(["experiment", "pairs", "--dataset", root, "--out", tmp_path / "o",
                              "--val-fraction", "0"], capsys)
    assert_one_line_error(code, out, err, "--val-fraction must be between 0 and 1")


@pytest.mark.torch
def test_experiment_data_without_test_is_held_out(tmp_path, capsys):
    from capsctl.experiment.run import _prepare

    root = _set(tmp_path / "ds", n_test=None)
    with pytest.raises(CapsctlError, match="no test/ folder"):
        _prepare("torch", str(root), None)
    _, train, test, _ = _prepare("torch", str(root), None, val_fraction=0.3)
    assert (len(train.images), len(test.images)) == (21, 9)


@pytest.mark.torch
def test_quiet_silences_the_first_decoding_bar(tmp_path, capsys, monkeypatch):
    from capsctl.data import folders

    monkeypatch.setattr(folders, "PROGRESS_MIN", 1)  # a bar even for this tiny folder
    root = _set(tmp_path / "ds")
    (tmp_path / "tiny.json").write_text(json.dumps(TINY))
    base = ["train", "--spec", tmp_path / "tiny.json", "--dataset", root, "--epochs", "1",
            "--batch-size", "8"]
    code, _, err = run_cli([*base, "-q", "--json", "--out", tmp_path / "a"], capsys)
    assert code == 0, err
    assert "decoding" not in err
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "fresh-cache"))  # decode again, now not quiet
    code, _, err = run_cli([*base, "--json", "--out", tmp_path / "b"], capsys)
    assert code == 0, err
    assert "decoding" in err


def test_a_data_set_path_that_is_not_utf8_is_cached(tmp_path):
    root = Path(os.fsdecode(bytes(tmp_path) + b"/ds-\xff"))  # a name with a byte that is not UTF-8
    _set(root)
    (train, _), _, classes = load_image_folder(root)
    (again, _), _, _ = load_image_folder(root)  # the second run reads the entry the first wrote
    assert classes == CLASSES and np.array_equal(train[0], again[0]) and len(_entries()) == 1


@pytest.mark.torch
def test_held_out_scores_of_a_model_trained_on_every_training_image_are_refused(tmp_path, capsys):
    """`eval --holdout` on a model trained without a hold-out scored images it had trained on: the shipped
    model (99.80% "held out", 98.74% on the test set) silently, and a run's model with a message blaming
    a change in the data. A file recording neither gets a note."""
    from capsctl.data.datasets import data_key
    from capsctl.model.shipped import shipped_model
    from capsctl.model.spec import ModelSpec
    from capsctl.model.weights import TRAINING_DATA_KEY, init_weights, save_model


    for command in ("eval", "eval-pairs"):
        code, out, err = run_cli([command, shipped_model(), "--holdout", "500"], capsys)
        assert_one_line_error(code, out, err, "trained on all 5,000 mnist-5k training images (no hold-out",
                              "score it on the test set")
    spec = ModelSpec.from_dict(TINY)
    every = json.dumps(list(data_key(datasets.load("mnist-5k").train().labels)))
    save_model(tmp_path / "all.safetensors", spec, init_weights(spec, 0), {TRAINING_DATA_KEY: every})
    code, out, err = run_cli(["eval", tmp_path / "all.safetensors", "--val-fraction", "0.1"], capsys)
    assert_one_line_error(code, out, err, "trained on all 5,000 mnist-5k training images (no hold-out")
    save_model(tmp_path / "old.safetensors", spec, init_weights(spec, 0))
    code, out, err = run_cli(["eval", tmp_path / "old.safetensors", "--holdout", "50", "--json"], capsys)
    assert code == 0 and json.loads(out)["images"] == 50, err
    assert "does not record the images it trained on" in " ".join(err.split())
