"""The paired-digit protocol, recomputed independently from its contract text."""

import numpy as np
import pytest

from capsctl.data.composites import make_composites, score_sets, set_matches
from capsctl.errors import CapsctlError


def _toy(n=50, seed=0):
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 10, n)
    x = (np.arange(n, dtype=np.float32)[:, None, None, None] + np.zeros((n, 28, 28, 1), np.float32)) / n
    return x, y


@pytest.mark.parametrize("layout", ["vertical", "horizontal"])
def test_pairs_follow_the_contract(layout):
    x, y = _toy()
    comp = make_composites(x, y, digits=2, layout=layout, seed=7)
    rng = np.random.default_rng(7)
    idx = rng.permutation(len(x))
    keep = [i for i in range(len(x)) if y[i] != y[idx[i]]]
    assert len(comp.images) == len(keep)
    axis = 1 if layout == "vertical" else 2
    for m, i in enumerate(keep):
        expected = np.concatenate([x[i], x[idx[i]]], axis=axis - 1)
        np.testing.assert_array_equal(comp.images[m], expected)
        assert list(comp.labels[m]) == [y[i], y[idx[i]]]
        assert list(comp.indices[m]) == [i, idx[i]]  # the source images, in placement order
    assert comp.images.shape[1:] == ((56, 28, 1) if layout == "vertical" else (28, 56, 1))


def test_three_digits_and_limit():
    x, y = _toy(200)
    comp = make_composites(x, y, digits=3, seed=0, limit=20)
    assert comp.images.shape == (20, 84, 28, 1)
    assert all(len(set(row)) == 3 for row in comp.labels.tolist())
    rng = np.random.default_rng(0)
    i1, i2 = rng.permutation(200), rng.permutation(200)
    first = next(i for i in range(200) if len({y[i], y[i1[i]], y[i2[i]]}) == 3)
    assert list(comp.labels[0]) == [y[first], y[i1[first]], y[i2[first]]]


def test_overlap_is_pixelwise_max_in_a_36px_canvas():
    x, y = _toy(30)
    comp = make_composites(x, y, layout="overlap", seed=1)
    assert comp.images.shape[1:] == (36, 36, 1)
    np.testing.assert_array_equal(comp.images, make_composites(x, y, layout="overlap", seed=1).images)
    # recompute from the contract: permutation, then offsets in 0..8 for each digit, pixel-wise max
    rng = np.random.default_rng(1)
    idx = rng.permutation(30)
    offsets = rng.integers(0, 9, size=(30, 2, 2))
    keep = [i for i in range(30) if y[i] != y[idx[i]]]
    for m, i in enumerate(keep):
        canvas = np.zeros((36, 36, 1), np.float32)
        for j, src in enumerate((i, idx[i])):
            r, c = offsets[i, j]
            canvas[r : r + 28, c : c + 28] = np.maximum(canvas[r : r + 28, c : c + 28], x[src])
        np.testing.assert_array_equal(comp.images[m], canvas)


def test_overlap_of_dark_ink_on_light_merges_the_ink_on_a_white_canvas():
    # a maximum of light images is a blank canvas; their ink is merged instead, 1 - max(1 - x)
    x, y = _toy(30)
    ink = make_composites(x, y, layout="overlap", seed=1)
    paper = make_composites(1 - x, y, layout="overlap", seed=1, light=True)
    np.testing.assert_allclose(paper.images, 1 - ink.images, atol=1e-6)
    assert paper.light and not ink.light
    np.testing.assert_array_equal(paper.labels, ink.labels)
    from capsctl.data.composites import alone

    np.testing.assert_allclose(alone(paper, 1, 1 - x, in_canvas=True).images,
                               1 - alone(ink, 1, x, in_canvas=True).images, atol=1e-6)
    # stacking layouts place whole images: the same either way
    for layout in ("vertical", "horizontal"):
        np.testing.assert_array_equal(make_composites(1 - x, y, layout=layout, light=True).images,
                                      make_composites(1 - x, y, layout=layout).images)


def test_scoring_sets_and_confidence():
    labels = np.array([[3, 5], [1, 2], [0, 9]])
    scores = np.zeros((3, 10))
    scores[0, [5, 3]] = [0.9, 0.8]  # right, confident
    scores[1, [2, 1]] = [0.9, 0.4]  # right, not confident
    scores[2, [0, 8]] = [0.9, 0.7]  # wrong
    r = score_sets(scores, labels)
    assert r == {"pairs": 3, "accuracy": pytest.approx(2 / 3), "confident_accuracy": pytest.approx(1 / 3)}
    correct, confident = set_matches(scores, labels)
    assert correct.tolist() == [True, True, False] and confident.tolist() == [True, False, False]


@pytest.mark.parametrize(
    ("kwargs", "msg"),
    [({"layout": "diagonal"}, "layout"), ({"digits": 1}, "digits"), ({"limit": 0}, "limit")],
)
def test_bad_options(kwargs, msg):
    x, y = _toy()
    with pytest.raises(CapsctlError, match=msg):
        make_composites(x, y, **kwargs)
