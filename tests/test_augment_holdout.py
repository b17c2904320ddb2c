"""Training-image augmentation (shift, zoom) and the held-out split used to choose recipes."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from capsctl.data import datasets
from capsctl.errors import CapsctlError
from capsctl.training.augment import augment_batch, shift_batch
from capsctl.training.config import TrainConfig

from ._helpers import assert_one_line_error, run_cli


def _blobs(n: int = 16, seed: int = 0) -> np.ndarray:
    """Smooth blobs well inside the frame, so a zoom keeps them whole and resampling is near exact."""
    rng = np.random.default_rng(seed)
    ys, xs = np.mgrid[:28, :28]
    cy, cx = rng.uniform(11, 16, (2, n, 1, 1))
    w = rng.uniform(2.0, 3.0, (n, 1, 1))
    return np.exp(-((ys - cy) ** 2 + (xs - cx) ** 2) / (2 * w**2)).astype(np.float32)[..., None]


def _centre_of_mass(im: np.ndarray) -> np.ndarray:
    ys, xs = np.mgrid[: im.shape[0], : im.shape[1]]
    m = im[..., 0].sum()
    return np.array([(im[..., 0] * ys).sum() / m, (im[..., 0] * xs).sum() / m])


def test_no_zoom_is_exactly_the_shift_augmentation() -> None:
    x = _blobs()
    for shift in (0, 1, 3):
        a = augment_batch(x, shift, 0.0, np.random.default_rng([4, 1, 2]))
        b = shift_batch(x, shift, np.random.default_rng([4, 1, 2]))
        assert np.array_equal(a, b)


def test_zoom_scales_about_the_centre() -> None:
    x = _blobs()
    y = augment_batch(x, 0, 0.3, np.random.default_rng(7))
    s = np.random.default_rng(7).uniform(0.7, 1.3, size=(len(x), 1))[:, 0]
    assert s.min() < 0.9 and s.max() > 1.1  # both directions are exercised
    centre = np.array([13.5, 13.5])
    for i in range(len(x)):
        # bilinear resampling keeps mass x s² and moves the centre of mass radially by s
        assert y[i].sum() / x[i].sum() == pytest.approx(s[i] ** 2, rel=0.02)
        np.testing.assert_allclose(_centre_of_mass(y[i]) - centre, s[i] * (_centre_of_mass(x[i]) - centre),
                                   atol=0.05)
    assert y.dtype == x.dtype and y.shape == x.shape and y.min() >= 0


def test_zoom_with_shift_moves_by_whole_pixels_and_fills_with_zeros() -> None:
    x = np.ones((32, 28, 28, 1), np.float32)
    y = augment_batch(x, 4, 1e-9, np.random.default_rng(3))  # zoom ~1: a pure integer shift
    rng = np.random.default_rng(3)
    rng.uniform(size=(32, 1))
    d = rng.integers(-4, 5, size=(32, 2))
    for i in range(32):
        dy, dx = d[i]
        rows = slice(max(dy, 0), 28 + min(dy, 0))
        cols = slice(max(dx, 0), 28 + min(dx, 0))
        assert y[i, rows, cols].min() == pytest.approx(1.0, abs=1e-5)  # the shifted image
        assert y[i].sum() == pytest.approx((28 - abs(dy)) * (28 - abs(dx)), abs=1e-3)  # zeros elsewhere


def test_scale_is_validated_and_recorded() -> None:
    assert TrainConfig.from_json(TrainConfig(scale=0.1).to_json()).scale == 0.1
    assert TrainConfig.from_json('{"epochs": 2}').scale == 0.0  # configs written before --scale existed
    for bad in (-0.1, 0.6, float("nan")):
        with pytest.raises(CapsctlError, match="--scale"):
            TrainConfig(scale=bad)


def test_hold_out_is_a_fixed_disjoint_draw() -> None:
    x = np.arange(50, dtype=np.float32).reshape(50, 1, 1, 1)
    split = datasets.Split(x, np.arange(50) % 10)
    rest, held = datasets.hold_out(split, 12)
    rest2, held2 = datasets.hold_out(split, 12)
    assert len(held.images) == 12 and len(rest.images) == 38
    assert np.array_equal(held.images, held2.images) and np.array_equal(rest.labels, rest2.labels)
    got = sorted(held.images.ravel().tolist() + rest.images.ravel().tolist())
    assert got == list(range(50))  # every image once, none in both
    # file order kept
    assert np.all(np.diff(held.images.ravel()) > 0) and np.all(np.diff(rest.images.ravel()) > 0)
    # labels travel with their images
    assert np.array_equal(held.labels, held.images.ravel().astype(int) % 10)
    assert held.images.ravel().tolist() != list(range(12))  # a random draw, not the first N
    for n in (0, 50):
        with pytest.raises(CapsctlError, match="--holdout"):
            datasets.hold_out(split, n)


@pytest.mark.torch
def test_pairs_with_holdout_never_scores_the_test_set(tmp_path: Path, mnist_dir: Path, capsys) -> None:
    out = tmp_path / "sel"
    code, _, err = run_cli(["experiment", "pairs", "--data-dir", mnist_dir, "--heads", "capsule",
                            "--seeds", "0", "--epochs", "1", "--limit", 100, "--holdout", 300, "--scale", 0.1,
                            "--tests", "test,vertical", "--out", out, "-q"], capsys)
    assert code == 0, err
    r = json.loads((out / "results.json").read_text())
    assert r["holdout"] == 300 and r["test_images"] == 300 and r["train_images"] == 100
    assert r["curve_test_images"] == 300  # (the curve's images: it said 2000, and so did its plot)
    assert r["overrides"] == {"epochs": 1, "scale": 0.1}
    assert "--holdout 300" in r["command"] and "--scale 0.1" in r["command"]
    (m,) = r["models"]
    assert m["run"] == "runs/torch-default-capsule-scale0.1-holdout300-s0"
    assert m["config"]["scale"] == 0.1
    assert m["tests"]["test"]["n"] == 300  # the held-out digits, not the 10,000 test images
    assert 250 <= m["tests"]["vertical"]["n"] <= 300  # composites built from those 300 digits
    assert "held out from training" in (out / "results.md").read_text()
    doc = tmp_path / "R.md"
    code, _, err = run_cli(["experiment", "report", out, "--out", doc], capsys)
    assert code == 0, err
    text = doc.read_text()
    # held-out scores are labelled as such and never set beside the test-set reference numbers
    assert "**holdout=300**" in text and "held-out digits" in text and "anchor capsule" not in text
    # 1 epoch, zoom: not the default
    assert "## How the default recipe was chosen" in text and "← default" not in text
    code, out, err = run_cli(["experiment", "pairs", "--data-dir", mnist_dir, "--holdout", 5000,
                              "--out", tmp_path / "x", "-q"], capsys)
    assert_one_line_error(code, out, err, "--holdout must be in 1..4999")


def test_the_default_recipe_is_recognised_in_a_run_config() -> None:
    from dataclasses import asdict

    from capsctl.experiment.report import _is_default_recipe
    from capsctl.training.recipes import get_recipe

    rec = get_recipe("default")
    cfg = TrainConfig(epochs=rec.capsule_epochs, lr=rec.lr, schedule=rec.schedule, shift=rec.shift,
                      recipe="default")
    assert _is_default_recipe(asdict(cfg))
    changes = ({"scale": 0.1}, {"epochs": rec.capsule_epochs + 1}, {"shift": rec.shift - 1},
               {"recipe": "seed"}, {"batch_size": rec.batch_size * 2}, {"recipe": "default-2026-11"})
    for change in changes:
        assert not _is_default_recipe({**asdict(cfg), **change}), change


def test_recipe_settings_take_overrides_that_are_given() -> None:
    from capsctl.training.recipes import get_recipe

    rec = get_recipe("seed")
    assert rec.settings("capsule")["epochs"] == rec.capsule_epochs
    assert rec.settings("pool")["epochs"] == rec.pool_epochs
    got = rec.settings("capsule", epochs=3, shift=0, scale=None, lr=None)
    assert got["epochs"] == 3 and got["shift"] == 0 and got["scale"] == rec.scale and got["lr"] == rec.lr
    assert TrainConfig(**got).epochs == 3  # every key is a TrainConfig field
    with pytest.raises(TypeError, match="routing"):
        rec.settings("capsule", routing="su")


def test_the_recipe_choice_names_each_folders_held_out_count() -> None:
    """The heading said every candidate was trained without the first folder's count of images."""
    from capsctl.experiment.report import _choice

    shipped = Path(__file__).resolve().parents[1] / "docs" / "results" / "select-b32-e15-shift5"
    r = json.loads((shipped / "results.json").read_text())
    assert r["holdout"] == 1000
    alone = _choice([(shipped, r)])
    assert "without 1000 training images (a fixed random draw)" in alone
    other = {**r, "holdout": 500}
    both = _choice([(shipped, r), (Path("other"), other)])
    assert "without some training images (500, 1,000, by folder) (a fixed random draw)" in both
